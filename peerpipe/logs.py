"""Structured logging: one JSON object per line on stderr, quiet (warnings only) by default."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # Fields passed with `extra=` become keys of their own.
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: int = logging.WARNING) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("peerpipe")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# A line for the person watching a node (the CLI prints it; library use logs it at info).
Report = Callable[[str], None]


def log_reporter(logger: logging.Logger) -> Report:
    return lambda line: logger.info("%s", line)
