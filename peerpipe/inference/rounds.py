"""Answers of a room whose stages take turns on one device, kept in step.

A stage batches the decode steps that reach it together (continuous batching). Answers whose
tokens come back at different times drift apart, and once two groups are more than a stage's
gather window apart they stay apart: on one H200 with 16 answers the stages ran a batch of 15
and a batch of 1 every round. A decode step costs a GPU about the same for 1 row as for 16, so
that is two forwards per round where one would do. Where the stages can run at once (several
GPUs: the plan's ``lanes``), groups apart are the pipelined schedule; where they take turns on
one device (``lanes`` 1) they only repeat work.

There the host holds an answer's next step until the steps that were still in flight when its
token came have landed too (or about two steps' time has passed): then all go in one turn of
the loop, as one compute-batch, and the groups merge into one. Steps sent after its token came
are its own round's and hold nothing.
"""

from __future__ import annotations

import asyncio
import time

MIN_WAIT_S = 0.001
MAX_WAIT_S = 5.0


Step = tuple[str, int]  # an answer's step: its task id and a number


class Rounds:
    def __init__(self) -> None:
        self._flying: dict[str, tuple[int, float]] = {}  # answer -> its step in flight: number, sent at
        self._behind: dict[str, set[Step]] = {}  # answer -> the steps in flight when its token came
        self._waiting: list[tuple[set[Step], asyncio.Future[None]]] = []
        self._count = 0
        self.step_s = 0.0  # the latest decode step's time, sent to token
        self.held = 0  # steps that waited for others (for tests and logs)

    async def join(self, task_id: str) -> None:
        """Before a decode step goes out: wait for the steps that were in flight when the
        answer's last token came (those sent since are this round's)."""
        behind = {(task, n) for task, n in self._behind.pop(task_id, ()) if self._flying.get(task, (0,))[0] == n}
        if not behind:
            return
        self.held += 1
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((behind, done))
        try:
            await asyncio.wait_for(done, min(max(2 * self.step_s, MIN_WAIT_S), MAX_WAIT_S))
        except TimeoutError:
            pass
        finally:
            self._waiting = [(b, f) for b, f in self._waiting if f is not done]

    def sent(self, task_id: str) -> None:
        self._count += 1
        self._flying[task_id] = (self._count, time.monotonic())

    def landed(self, task_id: str) -> None:
        """The answer's step is answered (its token came, or it failed or was dropped)."""
        step = self._flying.pop(task_id, None)
        if step is None:
            return
        self.step_s = time.monotonic() - step[1]
        self._behind[task_id] = {(task, n) for task, (n, _) in self._flying.items()}
        for behind, done in self._waiting:
            behind.discard((task_id, step[0]))
            if not behind and not done.done():
                done.set_result(None)

    def forget(self, task_id: str) -> None:
        """The answer is over."""
        self.landed(task_id)
        self._behind.pop(task_id, None)
