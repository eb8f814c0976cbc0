"""In-memory stand-ins for unit tests of a stage's handlers: a job table that
holds one job and records every write, and a publisher that records every event."""

from __future__ import annotations

from schemas.job import Job
from smi.jobtable.table import TransitionResult


class OneJobTable:
    """get, transition and update, as much of the job table as one job's step uses.
    Writes are recorded in ``writes``: ("transition", target, fields) or
    ("update", fields)."""

    def __init__(self, job: Job):
        self.job = job
        self.writes: list[tuple] = []
        self.deadlines: list[dict] = []  # the deadlines of each update that set any

    async def get(self, job_id: str) -> Job:
        assert job_id == self.job.job_id
        return self.job

    async def transition(self, job_id, target, *, actor, event_id, fields=None, clear=(), deadlines=None,
                         now=None) -> TransitionResult:
        previous = self.job.status
        self.writes.append(("transition", target, dict(fields or {})))
        self.job = self.job.model_copy(update={"status": target, **(fields or {})})
        return TransitionResult("applied", previous)

    async def update(self, job_id, fields, *, clear=(), expect_status=(), deadlines=None, clear_deadlines=(),
                     expect_fields=None, now=None) -> bool:
        if any(getattr(self.job, name) != value for name, value in (expect_fields or {}).items()):
            return False
        self.writes.append(("update", dict(fields)))
        self.job = self.job.model_copy(update={**fields, **{name: None for name in clear}})
        if deadlines:
            self.deadlines.append(dict(deadlines))
        return True

    @property
    def transitions(self) -> list[tuple]:
        """(target, fields) of each transition."""
        return [(write[1], write[2]) for write in self.writes if write[0] == "transition"]


class Published(list):
    """A Publisher that keeps (topic, key, value) of everything published."""

    async def __call__(self, spec, key, value) -> None:
        self.append((spec.name, key, value))
