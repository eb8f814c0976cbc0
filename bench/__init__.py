"""`make bench` / `smi bench`: the pipeline measured under load (issue 7).

- run.py        the command line; runs every measurement and writes the JSON
- system.py     the system under test (`smi run all` as a subprocess) and its helpers:
                a tiny-image server, an SMTP sink, the group-less event watcher
- pipeline.py   requests -> awaiting_payment, webhooks -> pending -> completed -> email
- baselines.py  raw aiokafka consume->produce and raw redis-py compare-and-set
- table.py      the job table: bytes per job, transition rate by table size, a janitor pass
- report.py     pure: percentiles, per-stage figures, targets, the table and the JSON

bench/ sits beside smi/ in the checkout and is not part of the installed package.
"""
