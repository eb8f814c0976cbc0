"""The processor's handling of an upscaler SUCCESS whose creditCost is no amount
(services/processor/handlers.py), against an in-memory stand-in for the job table."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.job import Job
from schemas.status import JobStatus
from schemas.topics import JOBS_COMPLETED
from services.processor.handlers import Processor, ProcessorConfig
from tests.support.one_job_table import OneJobTable, Published

JOB_ID = "3f1c2a9e-8d4b-4c6a-9f2e-1b7d5e0a4c3d"
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
QUOTED_CREDITS = 16  # 2000x2000 at 4x (design.md, "Money")
CREDIT_PRICE = 4


def processing_job() -> Job:
    return Job(job_id=JOB_ID, status=JobStatus.PROCESSING, image_url="https://images.example.com/a.png",
               resolution="4x", image_width=2000, image_height=2000, price_cents=384, credits=QUOTED_CREDITS,
               cost_cents=QUOTED_CREDITS * CREDIT_PRICE, upsampler_job_id="local-1", attempts=1,
               processing_started_at=T0, created_at=T0, updated_at=T0)


@pytest.fixture
def setup(tmp_path: Path):
    table, published = OneJobTable(processing_job()), Published()
    config = ProcessorConfig(storage_dir=tmp_path, allow=None, public_base_url="http://127.0.0.1:8080",
                             credit_price_cents=CREDIT_PRICE, poll_after=timedelta(seconds=30),
                             timeout=timedelta(minutes=10), submit_retries=3, max_result_bytes=10 ** 6)
    # The local backend is never called on this path: any object stands for it.
    processor = Processor(table, published, config, local=object(), clock=lambda: T0 + timedelta(minutes=1))
    result = tmp_path / JOB_ID / "upscaled-4x.png"
    result.parent.mkdir()
    result.write_bytes(b"\x89PNG\r\n\x1a\n")
    return processor, table, published, result


def success(result: Path, cost_json: str) -> bytes:
    # Built as text: ``NaN`` and ``Infinity`` are what json.dumps writes for
    # non-finite floats, and Python's parser (like the gateway's) reads them back.
    return (f'{{"job_id": "{JOB_ID}", "id": "local-1", "status": "SUCCESS", "creditCost": {cost_json}, '
            f'"imageUrl": null, "resultPath": {json.dumps(str(result))}}}').encode()


@pytest.mark.parametrize("cost_json", ["NaN", "Infinity", "-Infinity", '"nan"', '"inf"', "-1", "-0.5e3"])
async def test_a_success_whose_credit_cost_is_no_amount_completes_the_job_at_the_quoted_cost(setup, cost_json,
                                                                                          caplog):
    processor, table, published, result = setup
    outcome = await processor.on_upscaler_event(success(result, cost_json))
    assert outcome.startswith("completed")
    [(target, fields)] = table.transitions
    assert target is JobStatus.COMPLETED
    assert fields["upscaled_file_path"] == str(result.resolve())
    # The figure is informational (the customer paid the quote): the quote's stands.
    assert (fields["credits"], fields["cost_cents"]) == (QUOTED_CREDITS, QUOTED_CREDITS * CREDIT_PRICE)
    [(topic, key, _)] = published
    assert (topic, key) == (JOBS_COMPLETED.name, JOB_ID)
    assert any("which is no cost" in r.getMessage() for r in caplog.records), "a warning names the odd cost"


@pytest.mark.parametrize("cost_json,credits", [("2.5", 3), ("0", 0), ("16", 16), ("null", QUOTED_CREDITS)])
async def test_a_success_with_a_real_credit_cost_records_it(setup, cost_json, credits):
    processor, table, published, result = setup
    assert (await processor.on_upscaler_event(success(result, cost_json))).startswith("completed")
    [(_, fields)] = table.transitions
    assert (fields["credits"], fields["cost_cents"]) == (credits, credits * CREDIT_PRICE)
