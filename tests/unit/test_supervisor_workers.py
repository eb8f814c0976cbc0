"""How `smi run all --workers` reads its argument, and which processes it makes."""

from __future__ import annotations

import pytest

from smi.stages import STAGES
from smi.supervisor import MAX_WORKERS, Worker, parse_workers, workers_of


def test_workers_are_read_from_repeated_and_comma_separated_specs():
    assert parse_workers(["checkout=2", "notifier=3, processor=1"], STAGES) == {
        "checkout": 2, "notifier": 3, "processor": 1}
    assert parse_workers([], STAGES) == {}
    assert parse_workers([f"janitor={MAX_WORKERS}"], STAGES) == {"janitor": MAX_WORKERS}
    assert parse_workers(["gateway=2"], STAGES) == {"gateway": 2}  # they share its port and rate limits


@pytest.mark.parametrize("spec, says", [
    ("checkout", "STAGE=N"),
    ("=2", "STAGE=N"),
    ("checkout=0", "from 1"),
    (f"checkout={MAX_WORKERS + 1}", "from 1"),
    ("checkout=-1", "from 1"),
    ("checkout=two", "'two'"),
    ("mailer=2", "'mailer' is not one of"),
    ("checkout=2,checkout=2", "twice"),
])
def test_a_bad_spec_is_refused_with_what_is_wrong(spec, says):
    with pytest.raises(ValueError, match=None) as refused:
        parse_workers([spec], STAGES)
    assert says in str(refused.value)


def test_every_stage_gets_one_worker_unless_told_more_each_numbered_from_one():
    workers = workers_of(list(STAGES), {"checkout": 3})
    assert [w.label for w in workers] == ["checkout", "checkout.2", "checkout.3", "processor", "notifier",
                                          "janitor", "gateway"]
    assert workers[2] == Worker("checkout", 3)
    with pytest.raises(ValueError, match="no stage nobody"):
        workers_of(["checkout"], {"nobody": 2})
