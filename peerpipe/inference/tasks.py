"""A request's life on the host: status, tokens so far, timings; how long its steps may take, and
what recovering answers cost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peerpipe.protocol import Plan


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
    # ...and, when the rest of the room cannot hold the model, for a node to (re)join: a browser tab
    # reloading, a laptop waking (a new answer is told at once)
    rejoin_s: float = 30.0


class Cancelled(Exception):
    """The answer was cancelled (its task ends quietly)."""


class PlanLost(Exception):
    """The plan under a step went away; the answer resumes on the next one."""


def stage_spans(plan: Plan) -> tuple[tuple[str, int, int], ...]:
    """Who holds which layers: two plans with the same spans keep every stage's KV caches."""
    return tuple((s.node_id, s.start, s.end) for s in plan.stages)
