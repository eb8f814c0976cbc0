"""The layout of a job's files (smi/jobfiles.py) and what a purge of its failed
attempts removes: attempts up to the one the janitor read, and files of the
layout before attempts had directories; never a later attempt's directory."""

from __future__ import annotations

from smi.jobfiles import attempt_dir, job_dir, remove_attempts

JOB_ID = "3f1c2a9e-8d4b-4c6a-9f2e-1b7d5e0a4c3d"


def test_each_attempt_has_a_directory_of_its_own_under_the_jobs(tmp_path):
    assert job_dir(tmp_path, JOB_ID) == tmp_path / JOB_ID
    assert attempt_dir(tmp_path, JOB_ID, 3) == tmp_path / JOB_ID / "attempt-3"


def test_a_purge_through_attempt_n_keeps_a_later_attempts_files(tmp_path):
    for attempt in (1, 2, 3):
        directory = attempt_dir(tmp_path, JOB_ID, attempt)
        directory.mkdir(parents=True)
        (directory / "upscaled-4x.png").write_bytes(b"x")
    (job_dir(tmp_path, JOB_ID) / "upscaled-4x.download").write_bytes(b"older layout")

    remove_attempts(tmp_path, JOB_ID, through=2)

    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        JOB_ID, f"{JOB_ID}/attempt-3", f"{JOB_ID}/attempt-3/upscaled-4x.png"]


def test_a_purge_of_every_attempt_removes_the_jobs_directory_and_is_idempotent(tmp_path):
    directory = attempt_dir(tmp_path, JOB_ID, 1)
    directory.mkdir(parents=True)
    (directory / ".source-1").write_bytes(b"x")
    remove_attempts(tmp_path, JOB_ID, through=1)
    assert list(tmp_path.iterdir()) == []
    remove_attempts(tmp_path, JOB_ID, through=1)  # a re-claim after a crash: nothing left, no error


def test_a_job_id_that_leaves_storage_touches_nothing(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_bytes(b"x")
    remove_attempts(storage, "../elsewhere", through=99)
    assert (outside / "keep").exists()
