"""Run an API request through the room: tokens in, a stream of text pieces and a result out.

Admission happens here: the room runs ``sessions`` answers at once and lets ``max_pending`` more
wait; beyond that a request is refused at once ("server busy") rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from peerpipe.api.errors import ApiError, bad_request
from peerpipe.api.requests import ChatRequest, CompletionRequest, Sampling, check_model
from peerpipe.engine.defaults import sampling_params
from peerpipe.engine.errors import TokenizerError
from peerpipe.engine.generate import GenerationResult
from peerpipe.engine.sampling import InvalidSamplingParams, SamplingParams
from peerpipe.inference.errors import NotReadyError, TaskFailedError
from peerpipe.inference.pipeline import Pipeline

log = logging.getLogger(__name__)
Ready = Callable[[], Awaitable[Pipeline]]  # the room's pipeline once every stage has loaded


def _params(sampling: Sampling, max_tokens: int, model_dir: Path | None) -> SamplingParams:
    # Sampling has the fields engine.defaults.sampling_params reads; only max_tokens is settled here.
    request = dataclasses.replace(sampling, max_tokens=max_tokens)
    try:
        return sampling_params(request, model_dir)
    except InvalidSamplingParams as exc:
        raise bad_request(str(exc)) from exc


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
        """The finished answer; a stage failure becomes a 500 in OpenAI's shape."""
        try:
            return await asyncio.shield(self.task)
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
    def __init__(
        self,
        ready: Ready,
        *,
        model_id: str,
        model_dir: Path | None,
        sessions: int,
        max_pending: int,
        on_finish: Callable[[asyncio.Task[GenerationResult]], None] | None = None,
    ) -> None:
        self.ready = ready
        self.on_finish = on_finish
        self.model_id = model_id
        self.model_dir = model_dir
        self.capacity = sessions + max_pending
        self.in_flight = 0

    async def pipeline(self) -> Pipeline:
        try:
            return await self.ready()
        except NotReadyError as exc:
            raise ApiError(503, f"the room is not ready: {exc}", "server_error", "not_ready") from exc

    async def start(self, request: ChatRequest | CompletionRequest) -> Job:
        check_model(request.model, self.model_id)
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
            ids = self._prompt_ids(pipeline, request)
            params = self._params_for(pipeline, request, ids)
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

        task = asyncio.create_task(pipeline.generate(ids, params, on_text, task_id=job_id))
        job = Job(job_id, ids, task, pipeline, pieces)

        def finished(done: asyncio.Task[GenerationResult]) -> None:
            self.in_flight -= 1
            pieces.put_nowait(None)
            if self.on_finish is not None:
                self.on_finish(done)

        task.add_done_callback(finished)
        return job

    def _params_for(
        self, pipeline: Pipeline, request: ChatRequest | CompletionRequest, ids: list[int]
    ) -> SamplingParams:
        room = pipeline.max_seq - len(ids)
        if room < 1:
            raise bad_request(
                f"the prompt has {len(ids)} tokens; this room's context holds {pipeline.max_seq}, "
                "which leaves no room for an answer",
                param="messages" if isinstance(request, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        wanted = request.sampling.max_tokens
        return _params(request.sampling, min(wanted, room) if wanted else room, self.model_dir)

    def _prompt_ids(self, pipeline: Pipeline, request: ChatRequest | CompletionRequest) -> list[int]:
        tokenizer = pipeline.tokenizer
        if isinstance(request, ChatRequest):
            try:
                return tokenizer.apply_chat_template_ids(list(request.messages), add_generation_prompt=True)
            except TokenizerError as exc:
                raise bad_request(str(exc), param="messages") from exc
        if isinstance(request.prompt, str):
            return tokenizer.encode(request.prompt)
        vocab = tokenizer.vocab_size
        if max(request.prompt) >= vocab:
            raise bad_request(f"prompt token ids must be below the vocabulary size {vocab}", param="prompt")
        return list(request.prompt)


@contextlib.contextmanager
def cancel_on_exit(job: Job) -> Iterator[Job]:
    """Cancel the answer if the handler leaves early (client gone, server stopping)."""
    try:
        yield job
    finally:
        job.cancel()
