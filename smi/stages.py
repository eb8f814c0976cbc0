"""Run one stage in this process: `smi run <stage>` and `python -m services.<stage>`.
Faust stages run under faust's Worker (signal handling, graceful rebalance on
SIGTERM); the gateway runs under asyncio directly."""

from __future__ import annotations

import asyncio
import importlib
import logging

from smi.settings import Settings

FAUST_STAGES = ("checkout", "processor")  # grows as the other stages land
STAGES = FAUST_STAGES + ("gateway",)


def run_stage(stage: str, settings: Settings, *, loglevel: str = "info") -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    if stage == "gateway":
        from services.gateway.app import serve

        logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s gateway %(name)s: %(message)s")
        asyncio.run(serve(settings))
        return
    from faust import Worker

    module = importlib.import_module(f"services.{stage}.app")
    app, _ = module.build(settings)
    Worker(app, loglevel=loglevel).execute_from_commandline()
