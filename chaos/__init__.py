"""Chaos run (issue 7): jobs through the whole system on a stack of its own while
stage processes, Redis and the Kafka broker are killed and restarted, then checks
that every job had exactly-once outcomes. `make chaos` or `python -m chaos.run`."""
