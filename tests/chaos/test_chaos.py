"""The CI-sized chaos run (issue 7): 150 jobs through every stage as its own
process, on a stack of the test's own (never the shared one: the run kills Redis
and restarts Kafka), while stage processes are SIGKILLed every few seconds, a
second processor joins and is killed, Redis is SIGKILLed and restarts from its
AOF, and the broker restarts. Then every exactly-once check of chaos/checks.py
must hold. It runs twice: with the local upscaler, and on the paid Upsampler path
(the fake Upsampler server), where one paid upscale per job is checked too.
`make chaos` is the same run with 2,000 jobs."""

from __future__ import annotations

import json

import pytest

from chaos import run as chaos_cli
from chaos.driver import ChaosConfig, ChaosRun

JOBS = 150


@pytest.fixture(scope="module", params=["local", "upsampler"])
async def chaos_results(request, tmp_path_factory):
    lines: list[str] = []
    run_dir = tmp_path_factory.mktemp("chaos")

    def say(line: str) -> None:  # kept for the failure message, and on disk to follow a run live
        lines.append(line)
        with (run_dir / "progress.log").open("a") as progress:
            progress.write(line + "\n")

    config = ChaosConfig(jobs=JOBS, seed=7, bad_fraction=0.1, publish_seconds=40, kill_every=(4.0, 7.0),
                         second_worker="processor", settle_timeout=150, ready_timeout=180, run_dir=run_dir,
                         say=say, upscaler=request.param)
    results = await ChaosRun(config).run()
    (config.run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    results["_output"] = "\n".join(lines[-40:])
    return results


@pytest.mark.timeout(900)
async def test_the_faults_happened(chaos_results):
    faults = chaos_results["faults"]
    whats = [entry["what"] for entry in chaos_results["timeline"]]
    assert faults["sigkills_total"] >= 3, faults
    assert {"redis killed", "kafka restarted", "second worker starts", "second worker killed"} <= set(whats), whats
    assert faults["starts"]["processor#2"] == 1
    # The jobs were still flowing when the faults hit: not every request was in before the broker restart.
    restart = next(e for e in chaos_results["timeline"] if e["what"] == "kafka restarted")
    published = next(e for e in chaos_results["timeline"] if e["what"] == "all requests published")
    assert restart["started"] < published["t"]


@pytest.mark.timeout(900)
async def test_every_job_ended_where_it_should_with_exactly_once_effects(chaos_results):
    assert chaos_results["settled"], chaos_results["_output"]
    failed = {c["name"]: (c["summary"], c["examples"]) for c in chaos_results["checks"] if not c["ok"]}
    assert failed == {}, f"{failed}\n{chaos_results['_output']}"
    counts = chaos_results["counts"]
    upscales = [c for c in chaos_results["checks"] if c["name"] == "one paid upscale per job"]
    assert len(upscales) == (chaos_results["config"]["upscaler"] == "upsampler")
    assert counts["jobs"] == JOBS
    assert counts["statuses"] == {"completed": JOBS - 15, "failed": 15}


def test_bad_arguments_exit_2_with_a_message(capsys):
    assert chaos_cli.main(["--jobs", "0"]) == 2
    assert "--jobs must be ≥ 1" in capsys.readouterr().err
    assert chaos_cli.main(["--bad-fraction", "1.5"]) == 2
    assert chaos_cli.main(["--session-timeout", "2"]) == 2
    assert chaos_cli.main(["--stage-env", "no-equals-sign"]) == 2
    assert chaos_cli.main(["--upsampler-late", "0.1"]) == 2
    assert "--upsampler-late needs --upscaler upsampler" in capsys.readouterr().err
    assert chaos_cli.main(["--upscaler", "upsampler", "--upsampler-late", "2"]) == 2
    with pytest.raises(SystemExit) as exit_:
        chaos_cli.main(["--kill-every", "5:1"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        chaos_cli.main(["--port-range", "9000"])
    assert exit_.value.code == 2
