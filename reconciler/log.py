"""The daemon's log lines: plain text for people, one JSON object per line for machines.

Records carry structured fields in `extra={"fields": {...}}` (use `event()`);
the text format appends them as key=value, the JSON format puts them at the
top level next to `time`, `level`, `logger` and `message`, so a log pipeline
can select passes, repairs and their actions without parsing prose.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

FIELDS = "fields"


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log `message` with structured `fields`."""
    logger.log(level, message, extra={FIELDS: fields})


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"{_timestamp(record)} {record.levelname:<7} {record.getMessage()}"
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            parts = []
            for key, value in fields.items():
                if key == "actions" and isinstance(value, list):
                    continue  # listed below, one per line
                rendered = value if isinstance(value, str | int | float) else json.dumps(value, default=str)
                parts.append(f"{key}={rendered}")
            if parts:
                text += "  " + " ".join(parts)
            for action in fields.get("actions", []) if isinstance(fields.get("actions"), list) else []:
                if isinstance(action, dict):
                    symbol = {"add": "+", "change": "~", "remove": "-"}.get(action.get("op", ""), "?")
                    origin = f"   # {action['origin']}" if action.get("origin") else ""
                    text += f"\n    {symbol} {action.get('kind', '')} {action.get('key', '')}{origin}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Send kernform's log records to `stream` (stderr) in `fmt` ("text" or "json")."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Libraries' chatter is not the daemon's story.
    for noisy in ("pyroute2", "watchdog", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
