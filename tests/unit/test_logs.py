"""smi.logs: the text and JSON-lines formats of a stage's log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from smi.logs import JsonLinesFormatter, TextFormatter


def record(message: str, *args: object, exc_info=None, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("smi.test", level, __file__, 1, message, args, exc_info)


def raised() -> tuple:
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError as exc:
        return (type(exc), exc, exc.__traceback__)


def test_json_line_has_the_fields():
    line = JsonLinesFormatter("checkout").format(record("job %s: %s", "j-1", "opened", level=logging.WARNING))
    entry = json.loads(line)
    assert set(entry) == {"ts", "level", "stage", "logger", "message"}
    assert entry["level"] == "WARNING"
    assert entry["stage"] == "checkout"
    assert entry["logger"] == "smi.test"
    assert entry["message"] == "job j-1: opened"


def test_json_timestamp_is_rfc3339_utc():
    entry = json.loads(JsonLinesFormatter("checkout").format(record("hello")))
    assert entry["ts"].endswith("Z")
    moment = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00"))
    assert moment.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - moment) < timedelta(minutes=1)


@pytest.mark.parametrize("message", ["two\nlines", "carriage\rreturn", "separator\u2028here", "tab\there"])
def test_json_record_is_one_line_whatever_the_message(message):
    line = JsonLinesFormatter("checkout").format(record(message, exc_info=raised()))
    assert line.splitlines() == [line]
    assert json.loads(line)["message"] == message


def test_json_includes_the_exception_text():
    entry = json.loads(JsonLinesFormatter("processor").format(record("failed", exc_info=raised())))
    assert entry["message"] == "failed"
    assert "Traceback (most recent call last)" in entry["exc_info"]
    assert "ValueError: bad value\nsecond line" in entry["exc_info"]


def test_text_format_names_the_stage():
    formatter = TextFormatter("notifier")
    line = formatter.format(record("sent %d emails", 3))
    assert line.endswith(" INFO notifier smi.test: sent 3 emails")
    assert TextFormatter("100%").format(record("x")).endswith(" INFO 100% smi.test: x")


SCRIPT = """
import logging, sys
from smi.logs import setup_logging
setup_logging("janitor", "info", sys.argv[1])
log = logging.getLogger("smi.test.setup")
log.debug("not shown")
log.info("first")
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("second")
"""


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_setup_logging_writes_records_to_stderr_in_the_format(fmt):
    # A process of its own: dictConfig replaces the root logger's handlers, pytest's too.
    done = subprocess.run([sys.executable, "-c", SCRIPT, fmt], capture_output=True, text=True, timeout=30,
                          cwd=Path(__file__).resolve().parents[2], check=True)
    assert done.stdout == ""
    assert "not shown" not in done.stderr
    if fmt == "json":
        entries = [json.loads(line) for line in done.stderr.splitlines()]
        assert [e["message"] for e in entries] == ["first", "second"]
        assert {e["stage"] for e in entries} == {"janitor"}
        assert "RuntimeError: boom" in entries[1]["exc_info"]
    else:
        assert " INFO janitor smi.test.setup: first\n" in done.stderr
        assert " ERROR janitor smi.test.setup: second\nTraceback" in done.stderr
