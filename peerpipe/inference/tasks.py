"""A request's life on the host: status, tokens so far, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum


class TaskStatus(StrEnum):
    QUEUED = "queued"  # waiting for a free session
    PREFILL = "prefill"
    DECODING = "decoding"
    RECOVERING = "recovering"  # its stages went away; it replays once the room has a plan again
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED})


@dataclass
class Task:
    task_id: str
    prompt_tokens: int
    status: TaskStatus = TaskStatus.QUEUED
    tokens: list[int] = field(default_factory=list)
    error: str = ""
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def active(self) -> bool:
        return self.status not in FINAL

    @property
    def tok_s(self) -> float:
        if self.first_token is None or len(self.tokens) < 2:
            return 0.0
        end = self.finished or time.monotonic()
        return (len(self.tokens) - 1) / max(end - self.first_token, 1e-9)
