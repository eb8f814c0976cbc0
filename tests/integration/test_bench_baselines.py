"""The bench's baselines on the real broker (bench/baselines.py), at a small count:
each moves every message, and the stage agent's floor forwards every one."""

from __future__ import annotations

import os

import pytest

from bench import baselines

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
COUNT = 300

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("stage_agent", [False, True], ids=["ack_only", "stage_agent_forward"])
async def test_the_faust_floor_handles_every_message(stage_agent):
    figures = await baselines.faust_floor(KAFKA, COUNT, stage_agent=stage_agent, timeout=60)
    assert figures["count"] == COUNT and figures["seconds"] > 0
    # seconds is rounded to the millisecond, the rate (to 0.1) from the exact time
    assert COUNT / (figures["seconds"] + 0.0005) - 0.05 <= figures["rate"] <= COUNT / (figures["seconds"] - 0.0005) + 0.05


async def test_the_raw_passthrough_moves_every_message():
    figures = await baselines.kafka_passthrough(KAFKA, COUNT)
    assert figures["count"] == COUNT and figures["rate"] > 0
