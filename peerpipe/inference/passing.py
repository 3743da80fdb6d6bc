"""The host's side of tokens ahead (inference/tokens_ahead.py has the last stage's).

A last stage that shares memory with the host and the first stage answers a lone answer's
decode step before computing it: two pending copies of the token in its shared-memory ring.
The host passes the answer's next step on at once, its input the copy ``ComputeResult.ahead``
names, and reads its own copy once the stage has written it. So the host's turn and both hops
overlap the last stage's work. When the token then ends the answer (an end token, a stop
string), the step passed on is dropped like a cancelled one.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import numpy as np

from peerpipe.inference import trace
from peerpipe.inference.gpu_rows import pause
from peerpipe.inference.wire import row_bytes, shared_written
from peerpipe.protocol import ComputeError, ComputeRequest, ComputeResult
from peerpipe.room import LINK_ERRORS, Send

AHEAD_ERROR_S = 1.0  # how long a token given up by its stage waits for the stage's error


@dataclass(frozen=True)
class Pending:
    """A result that came ahead of its token: the token is read later; ``failed`` ends that wait
    (an error for the step, a lost stage)."""

    result: ComputeResult
    failed: asyncio.Future[None]


Token = list[int] | Pending  # what an answer's step gives: its tokens, or a result that came ahead
_Entry = tuple[asyncio.Future, int, int]  # a future, and the (plan version, position) it is for


class Ahead:
    """An answer's next step passed on before its token was read (its future, which the
    answer's next turn awaits instead of sending a step), and the tokens being read."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.sent = 0  # steps passed on so
        self._steps: dict[str, tuple[asyncio.Future[Token], int, int, ComputeRequest]] = {}
        self._reading: dict[str, _Entry] = {}

    def waiter(self, message: ComputeResult | ComputeError) -> asyncio.Future | None:
        """Where ``message`` goes if not to the step an answer waits for: the step passed on
        ahead, answered before the answer's turn came, or a token being read (its error)."""
        for table in (self._reading, self._steps):
            entry = table.get(message.task_id)
            if entry is not None and entry[1:3] == (message.plan_version, message.start_pos) and not entry[0].done():
                return entry[0]
        return None

    def pending(self, result: ComputeResult) -> Pending:
        """``result`` came ahead: from now on an error for its step, or a lost stage, fails its read."""
        failed: asyncio.Future[None] = _seen(asyncio.get_running_loop().create_future())
        self._reading[result.task_id] = (failed, result.plan_version, result.start_pos)
        return Pending(result, failed)

    def take(self, task_id: str, version: int, position: int) -> tuple[ComputeRequest, asyncio.Future[Token]] | None:
        """The answer's passed-on step if it is the one due (same plan, same position); forgotten either way."""
        step = self._steps.pop(task_id, None)
        return (step[3], step[0]) if step is not None and step[1:3] == (version, position) else None

    def forget(self, task_id: str) -> None:
        self._steps.pop(task_id, None)
        self._reading.pop(task_id, None)

    def fail(self, error: Exception) -> None:
        for waiter, *_ in (*self._steps.values(), *self._reading.values()):
            if not waiter.done():
                waiter.set_exception(error)

    async def send_next(self, first_stage: str, version: int, result: ComputeResult) -> bool:
        """The step after ``result``'s, its input the token's copy for the first stage; False
        when the first stage cannot be reached (the token's own wait then learns why)."""
        assert result.ahead is not None
        request = ComputeRequest(result.task_id, result.ahead, result.task_id, version, result.start_pos + 1)
        waiter: asyncio.Future[Token] = _seen(asyncio.get_running_loop().create_future())
        self._steps[result.task_id] = (waiter, version, request.start_pos, request)
        trace.mark("send", request.task_id, request.start_pos)
        try:
            await self.send(first_stage, request)
        except LINK_ERRORS:
            self._steps.pop(result.task_id, None)
            return False
        trace.mark("sent", request.task_id, request.start_pos)
        self.sent += 1
        return True

    async def read(self, pending: Pending) -> list[int]:
        """The host's copy of a token sent ahead, once written. Polled on the loop's turns: a
        first stage in this process polls for its own copy meanwhile, and must launch first. A
        copy its stage gave up on raises the stage's error when it comes soon after, else
        ``SharedMemoryError``."""
        result, failed = pending.result, pending.failed
        try:
            while not shared_written(result.output_tensor):
                if failed.done():
                    failed.result()  # raises
                await pause(True)
            try:
                tokens = [int(t) for t in np.frombuffer(row_bytes(result.output_tensor), dtype="<i8")]
            except Exception:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(AHEAD_ERROR_S):
                        await failed
                raise
            trace.mark("token", result.task_id, result.start_pos)
            return tokens
        finally:
            if self._reading.get(result.task_id, (None,))[0] is failed:
                del self._reading[result.task_id]


def _seen(future: asyncio.Future) -> asyncio.Future:
    """A future whose exception nobody may await (its answer moved on) is not logged as lost."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future
