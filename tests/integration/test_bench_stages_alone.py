"""The bench's stages-alone part (bench/alone.py) on the real broker and Redis, at a
small count: `python -m bench.run --parts stages` starts each stage once its work
waits, every job goes the whole way, and each phase gets its figures and CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bench.cpu import PHASE_OWNERS
from smi.jobtable import connect
from smi.settings import Settings
from smi.stack.topics import delete_namespace

REPO = Path(__file__).resolve().parents[2]
JOBS = 40
PHASES = ("alone_request_to_awaiting_payment", "alone_webhook_to_pending", "alone_pending_to_completed",
          "alone_completed_to_email")

pytestmark = pytest.mark.timeout(600)


async def test_each_stage_alone_drains_every_job_and_is_measured(tmp_path):
    namespace = f"test-alone-{uuid.uuid4().hex[:8]}."
    out = tmp_path / "bench.json"
    env = {**os.environ, "KAFKA_NAMESPACE": namespace}
    try:
        run = subprocess.run([sys.executable, "-m", "bench.run", "--jobs", str(JOBS), "--parts", "stages",
                              "--no-profile", "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=540)
    finally:
        await delete_namespace(Settings(kafka_namespace=namespace))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["errors"] == []
    for phase in PHASES:
        figures = results["stages"][phase]
        assert figures["count"] == JOBS and figures["complete"], (phase, figures)
        assert figures["rate"] > 0
    # Each phase watched the stages started so far, and only those: the stage that
    # drains it, and none of the ones started after it. (Their CPU is not checked:
    # 40 jobs drain in a blink.)
    owners = ["checkout", "checkout", "processor", "notifier"]
    later = {"alone_request_to_awaiting_payment": {"gateway", "processor", "notifier"},
             "alone_webhook_to_pending": {"processor", "notifier"}, "alone_pending_to_completed": {"notifier"},
             "alone_completed_to_email": set()}
    for phase, owner in zip(PHASES, owners):
        watched = set(results["bottlenecks"][phase]["cores"])
        assert owner == PHASE_OWNERS[phase] and owner in watched and not watched & later[phase], (phase, watched)
    # Each stage's own target row is judged on its rate.
    targets = {row["figure"]: row for row in results["targets"]}
    for phase in PHASES:
        row = targets[f"stages.{phase}.rate"]
        assert row["value"] == results["stages"][phase]["rate"]
        assert row["status"] in ("met", "MISSED"), row
    assert targets["stages.pending_to_completed.rate"]["status"] == "not measured"  # the pipeline part did not run
    # Its scratch namespace in Redis is gone.
    redis = connect(Settings().redis_url)
    try:
        assert [key async for key in redis.scan_iter(match=f"*bench{results['run_id']}a:*")] == []
    finally:
        await redis.aclose()
