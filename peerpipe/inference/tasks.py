"""A request's life on the host: status, tokens so far, timings; how long its steps may take, and
what recovering answers cost."""

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


@dataclass
class RecoveryStats:
    failovers: int = 0  # times a plan under running answers went away
    replayed_tokens: int = 0  # positions prefilled again to rebuild lost KV caches
    stall_s: float = 0.0  # summed over answers: last token before a loss to the first after
    stalls: int = 0  # answers that resumed


@dataclass(frozen=True)
class Timeouts:
    prefill_s: float = 300.0  # the first token of an answer (or of a replay)
    stall_s: float | None = None  # every later token; past it the stages are checked and the answer
    # replays (None: derived from the plan's predicted time per token)
    recover_s: float = 120.0  # how long a paused answer waits for the room to have a plan again
