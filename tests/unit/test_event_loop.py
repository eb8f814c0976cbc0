"""EVENT_LOOP: the loop a stage process runs on, its own and the one Faust's
consumer makes in a thread of its own (a subprocess each: the choice is
process-wide)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOOPS = """
import asyncio, logging, sys, threading
from smi.stages import use_event_loop
logging.basicConfig(level=logging.INFO)  # a stage's logging, in short
use_event_loop(sys.argv[1])
kinds = [type(asyncio.new_event_loop()).__module__]
thread = threading.Thread(target=lambda: kinds.append(type(asyncio.new_event_loop()).__module__))
thread.start(); thread.join()
print(" ".join(kind.split(".")[0] for kind in kinds))
"""


@pytest.mark.parametrize("kind, module", [("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_every_loop_the_process_makes_is_of_the_kind_chosen(kind, module):
    run = subprocess.run([sys.executable, "-c", LOOPS, kind], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [module, module]  # the main thread's, and another thread's
    assert f"event loop: {module}" in run.stderr  # said in the stage's log
