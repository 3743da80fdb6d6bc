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

import numpy as np

from peerpipe.inference import trace
from peerpipe.inference.gpu_rows import pause
from peerpipe.inference.wire import row_bytes, shared_written
from peerpipe.protocol import ComputeError, ComputeRequest, ComputeResult
from peerpipe.room import LINK_ERRORS, Send

Token = list[int] | ComputeResult  # a step's tokens, or the last stage's result that sends them ahead
AHEAD_ERROR_S = 1.0  # how long a token given up by its stage waits for the stage's error


class Passed:
    """Each answer's next step, passed on before its token was read: the future its answer
    awaits (in place of one armed at sending) and the request, which the answer's next turn
    then awaits instead of making and sending one."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.sent = 0  # steps passed on so
        self._steps: dict[str, tuple[asyncio.Future[Token], int, int, ComputeRequest]] = {}

    def waiter(self, message: ComputeResult | ComputeError) -> asyncio.Future[Token] | None:
        """The future of the passed-on step ``message`` answers, if any."""
        step = self._steps.get(message.task_id)
        return step[0] if step is not None and step[1:3] == (message.plan_version, message.start_pos) else None

    def take(self, task_id: str, version: int, position: int) -> tuple[ComputeRequest, asyncio.Future[Token]] | None:
        """The answer's passed-on step if it is the one due (same plan, same position); forgotten either way."""
        step = self._steps.pop(task_id, None)
        return (step[3], step[0]) if step is not None and step[1:3] == (version, position) else None

    def forget(self, task_id: str) -> None:
        self._steps.pop(task_id, None)

    def fail(self, error: Exception) -> None:
        for waiter, *_ in self._steps.values():
            if not waiter.done():
                waiter.set_exception(error)

    async def send_next(self, first_stage: str, version: int, result: ComputeResult) -> bool:
        """The step after ``result``'s, its input the token's copy for the first stage; False
        when the first stage cannot be reached (the token's own wait then learns why)."""
        assert result.ahead is not None
        request = ComputeRequest(result.task_id, result.ahead, result.task_id, version, result.start_pos + 1)
        waiter: asyncio.Future[Token] = asyncio.get_running_loop().create_future()
        self._steps[result.task_id] = (waiter, version, request.start_pos, request)
        trace.mark("send", request.task_id, request.start_pos)
        try:
            await self.send(first_stage, request)
        except LINK_ERRORS:
            self.forget(result.task_id)
            return False
        trace.mark("sent", request.task_id, request.start_pos)
        self.sent += 1
        return True


async def read_token(result: ComputeResult, failed: asyncio.Future[Token]) -> list[int]:
    """The host's copy of a token sent ahead, once written. Polled on the loop's turns: a first
    stage in this process polls for its own copy meanwhile, and must launch first. ``failed``
    ends the wait: an error for the step, or a lost stage. A copy its stage gave up on raises
    the stage's error when it comes soon after, else ``SharedMemoryError``."""
    data = result.output_tensor
    while not shared_written(data):
        if failed.done():
            failed.result()  # raises
        await pause(True)
    try:
        tokens = [int(t) for t in np.frombuffer(row_bytes(data), dtype="<i8")]
        trace.mark("token", result.task_id, result.start_pos)
        return tokens
    except Exception:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(AHEAD_ERROR_S):
                await failed
        raise
