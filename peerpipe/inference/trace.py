"""Where a token's time goes, hop by hop: timestamps along the token path, off unless asked for.

With ``PEERPIPE_TRACE=DIR`` every process appends one line per event to ``DIR/trace-<pid>.txt``:
``<monotonic ns> <event> <task id> <position> <node>``. The clock is the machine's monotonic
clock, shared by its processes, so the events of one step on nodes of one machine line up
(``bench/pipeline.py --trace`` reads them). Events, in the order a step meets them:

- ``send`` / ``sent``: the host sends the step to the first stage / has handed it to its socket;
- ``in``: a stage's node has the request (read, decrypted, decoded);
- ``start`` / ``end``: the stage's forward (with the copy of its output off the device); inside
  it ``launched`` (a GPU has the step's work), ``run`` (a GPU stage's output is on the host,
  less the time the GPU spent on the step, by CUDA events: the latest moment it could have
  started) and ``ready`` (the output is on the host);
- ``out``: the stage's node has handed the output to its socket (or to itself);
- ``token``: the host has the last stage's token.

Disabled, a mark costs one global read.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path
from typing import TextIO

_file: TextIO | None = None
_lines: list[str] = []


def _open() -> TextIO | None:
    folder = os.environ.get("PEERPIPE_TRACE", "")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    handle = open(Path(folder) / f"trace-{os.getpid()}.txt", "a", buffering=1 << 16)
    atexit.register(flush)
    return handle


def on() -> bool:
    """Whether marks are recorded (work done only for a trace can be skipped otherwise)."""
    return _file is not None


def mark(event: str, task_id: str, position: int, node: str = "", at_ns: int | None = None) -> None:
    """Record ``event`` for the step of ``task_id`` at ``position`` (when tracing), now or at
    ``at_ns`` on the monotonic clock."""
    if _file is not None:
        where = node.replace(" ", "") or "-"
        _lines.append(f"{time.monotonic_ns() if at_ns is None else at_ns} {event} {task_id} {position} {where}\n")
        if len(_lines) >= 256:
            flush()


def flush() -> None:
    if _file is not None and _lines:
        _file.writelines(_lines)
        _file.flush()
        _lines.clear()


_file = _open()
