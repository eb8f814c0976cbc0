"""Log output of a stage process: text for people, or JSON lines (LOG_FORMAT=json)
for log shippers. Either way every line names the stage, so the one merged stream
of `smi run all` still says where each line came from."""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import datetime, timezone
from typing import Any, Literal

LogFormat = Literal["text", "json"]


class TextFormatter(logging.Formatter):
    def __init__(self, stage: str):
        # The stage goes into the format string, so a "%" in it must not read as a field.
        super().__init__(f"%(asctime)s %(levelname)s {stage.replace('%', '%%')} %(name)s: %(message)s")


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record and so per line: a traceback is a field, and
    ASCII-only escaping keeps even U+2028 in a message from splitting the line."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
                  .replace("+00:00", "Z"),
            "level": record.levelname,
            "stage": self.stage,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def logging_config(stage: str, level: str, fmt: LogFormat) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict: the root logger at ``level``, writing
    to stderr in ``fmt``. Faust's Worker takes it as ``logging_config`` and applies
    it when it sets up logging, instead of its own colour format."""
    formatter = JsonLinesFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        # Loggers made at import time (every module's) must keep working.
        "disable_existing_loggers": False,
        "formatters": {"stage": {"()": formatter, "stage": stage}},
        "handlers": {"stage": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                               "formatter": "stage"}},
        "root": {"level": level.upper(), "handlers": ["stage"]},
    }


def setup_logging(stage: str, level: str = "info", fmt: LogFormat = "text") -> None:
    logging.config.dictConfig(logging_config(stage, level, fmt))
