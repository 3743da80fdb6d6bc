"""Run an API request through the room's inference entry: a stream of text pieces and a result.

Admission happens here: the room runs ``sessions`` answers at once and lets ``max_pending`` more
wait; beyond that a request is refused at once ("server busy") rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from peerpipe.api.errors import ApiError, bad_request
from peerpipe.api.requests import ChatRequest, CompletionRequest, check_model
from peerpipe.engine.decode import GenerationResult
from peerpipe.inference.entry import Entry
from peerpipe.inference.errors import ContextLengthError, NotReadyError, PromptError, TaskFailedError
from peerpipe.inference.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One answer in flight: its text pieces as they come, and its result."""

    job_id: str
    prompt_ids: list[int]
    task: asyncio.Task[GenerationResult]
    pipeline: Pipeline
    pieces: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.monotonic)
    first_piece: float | None = None  # when the first text arrived, for time to first token

    async def stream(self) -> AsyncIterator[str]:
        """Text as it comes; pieces that queued up while the last one was written go out as one,
        so a slow client costs fewer writes rather than falling further behind."""
        while (piece := await self.pieces.get()) is not None:
            more = []
            while not self.pieces.empty():
                nxt = self.pieces.get_nowait()
                if nxt is None:
                    self.pieces.put_nowait(None)  # seen again by the outer loop, which ends
                    break
                more.append(nxt)
            yield piece + "".join(more)

    async def result(self) -> GenerationResult:
        """The finished answer; a stage failure becomes a 500 in OpenAI's shape, an answer the
        stopping server cut off a 503 (a stream ends with it as its error event)."""
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self.task.cancelled() or (current is not None and current.cancelling()):
                raise  # (the handler itself is being cancelled)
            raise ApiError(503, "the answer was cut off: the server is stopping", "server_error", "server_stopping") from None
        except TaskFailedError as exc:
            raise ApiError(500, f"the room failed this request: {exc}", "server_error", "stage_failed") from exc
        except Exception as exc:
            log.exception("answer %s failed", self.job_id)
            raise ApiError(500, f"the answer failed: {type(exc).__name__}", "server_error", "internal") from exc

    def cancel(self) -> None:
        """The client went away: free every stage's slot for this answer."""
        if not self.task.done():
            self.pipeline.cancel(self.job_id)


class Generations:
    """The API's answers; every one is kept until it ends, and ``close`` cancels and awaits them."""

    def __init__(
        self,
        entry: Entry,
        *,
        model_id: str,
        max_pending: int,
        on_finish: Callable[[asyncio.Task[GenerationResult]], None] | None = None,
    ) -> None:
        self.entry = entry
        self.on_finish = on_finish
        self.model_id = model_id
        self.capacity = entry.config.sessions + max_pending
        self.in_flight = 0
        self._tasks: set[asyncio.Task[GenerationResult]] = set()
        self._closed = False

    async def close(self) -> None:
        """Cancel the answers still running and wait for them to end."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def pipeline(self) -> Pipeline:
        try:
            return await self.entry.wait_ready()
        except NotReadyError as exc:
            raise ApiError(503, f"the room is not ready: {exc}", "server_error", "not_ready") from exc

    async def start(self, request: ChatRequest | CompletionRequest) -> Job:
        check_model(request.model, self.model_id)
        if self._closed:
            raise ApiError(503, "the server is stopping", "server_error", "not_ready")
        # Counted from arrival, so requests waiting for the room to be ready are bounded too.
        if self.in_flight >= self.capacity:
            raise ApiError(
                503,
                f"the server is busy: {self.in_flight} requests are running or waiting; try again shortly",
                "server_error",
                "server_busy",
            )
        self.in_flight += 1
        try:
            pipeline = await self.pipeline()
            ids = self._prompt_ids(request)
            params = self.entry.params(request.sampling, len(ids))
            speculate = self.entry.speculator.mode_for(request.speculate)
        except ContextLengthError as exc:
            self.in_flight -= 1
            param = "messages" if isinstance(request, ChatRequest) else "prompt"
            raise bad_request(str(exc), param=param, code="context_length_exceeded") from exc
        except PromptError as exc:
            self.in_flight -= 1
            raise bad_request(str(exc)) from exc
        except BaseException:
            self.in_flight -= 1
            raise
        job_id = ("chatcmpl-" if isinstance(request, ChatRequest) else "cmpl-") + uuid.uuid4().hex
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        job: Job

        def on_text(piece: str) -> None:
            if job.first_piece is None:
                job.first_piece = time.monotonic()
            pieces.put_nowait(piece)

        task = asyncio.create_task(pipeline.generate(ids, params, on_text, task_id=job_id, speculate=speculate))
        self._tasks.add(task)
        job = Job(job_id, ids, task, pipeline, pieces)

        def finished(done: asyncio.Task[GenerationResult]) -> None:
            self._tasks.discard(done)
            self.in_flight -= 1
            pieces.put_nowait(None)
            if self.on_finish is not None:
                self.on_finish(done)

        task.add_done_callback(finished)
        return job

    def _prompt_ids(self, request: ChatRequest | CompletionRequest) -> list[int]:
        if isinstance(request, ChatRequest):
            try:
                return self.entry.prompt_ids(list(request.messages))
            except PromptError as exc:
                raise bad_request(str(exc), param="messages") from exc
        try:
            return self.entry.prompt_ids(request.prompt)
        except PromptError as exc:
            raise bad_request(str(exc), param="prompt") from exc


@contextlib.contextmanager
def cancel_on_exit(job: Job) -> Iterator[Job]:
    """Cancel the answer if the handler leaves early (client gone, server stopping)."""
    try:
        yield job
    finally:
        job.cancel()
