"""The host's way into inference: the one place that turns a prompt and sampling choices into an
answer through the room's pipeline, for the API, the CLI's remote clients and Python alike.

It holds the model's tokenizer and sampling defaults (read once) and the room's pipeline, which
it hands each plan once every stage has loaded it (answers pause when a plan takes their stages
away, and replay on the next), and waits (bounded) for the room to be ready. It knows nothing of
membership: the cluster's rollout tells it about plans, and ``why_not_ready`` is the cluster's
own account of what is missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peerpipe.engine.decode import GenerationResult, OnText
from peerpipe.engine.defaults import GenerationDefaults
from peerpipe.engine.draft_model import DraftModel
from peerpipe.engine.errors import TokenizerError
from peerpipe.engine.generate import encode_prompt
from peerpipe.engine.sampling import InvalidSamplingParams, SamplingParams
from peerpipe.engine.tokenizer import Tokenizer
from peerpipe.errors import PeerpipeError
from peerpipe.inference.errors import ContextLengthError, NotReadyError, PromptError
from peerpipe.inference.pipeline import OnStall, Pipeline, Timeouts
from peerpipe.inference.speculation import SpeculationConfig, Speculator
from peerpipe.inference.tasks import Task
from peerpipe.logs import Report, log_reporter
from peerpipe.protocol import GenerateDone, GenerateRequest, GenerateText, Plan, Sampling, TaskInfo
from peerpipe.room import Send

log = logging.getLogger(__name__)
RECENT_ANSWERS = 16  # how many finished answers the measured pace averages
Messages = Sequence[dict[str, str]]


@dataclass(frozen=True)
class EntryConfig:
    sessions: int = 4  # answers the stages hold KV cache for at once
    max_seq: int = 4096  # positions per session on every stage
    ready_timeout_s: float = 60.0  # how long a request waits for the stages to load
    timeouts: Timeouts = field(default_factory=Timeouts)  # of an answer's steps and recoveries
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)  # drafting, by default
    prefill_chunk: int | None = None  # long prompts go to several stages in chunks of this size (0: whole; None: auto)


class Entry:
    def __init__(
        self,
        model_dir: Path,
        *,
        host_id: str,
        send: Send,
        config: EntryConfig | None = None,
        why_not_ready: Callable[[], str] = lambda: "the room has no plan yet",
        on_stall: OnStall | None = None,
        report: Report | None = None,
        draft: DraftModel | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.host_id = host_id
        self.config = config or EntryConfig()
        self.why_not_ready = why_not_ready
        self.report = report or log_reporter(log)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.defaults = GenerationDefaults.from_dir(model_dir)
        self.send = send
        self.pipeline = Pipeline(
            host_id=host_id,
            send=send,
            tokenizer=self.tokenizer,
            sessions=self.config.sessions,
            max_seq=self.config.max_seq,
            timeouts=self.config.timeouts,
            on_stall=on_stall,
            report=self.report,
            speculator=Speculator(self.config.speculation, draft),
            prefill_chunk=self.config.prefill_chunk,
        )
        self._changed = asyncio.Event()
        self.unplannable = ""  # why the room's last try to plan failed; "" once it plans again

    # -- plans, from the cluster ------------------------------------------------------------

    def use_plan(self, plan: Plan, names: dict[str, str]) -> None:
        """Every stage has loaded ``plan``: answers run (or resume) through it from now on."""
        kept = self.pipeline.keeps(plan)
        self.pipeline.use_plan(plan, names)
        if not kept and self.pipeline.local:
            self.report("ready: every layer is on this node; answers run locally, with no network hops")
        elif not kept:
            self.report(f"ready: {' -> '.join(self.pipeline.describe())}")
        self._changed.set()

    def replanned(self, plan: Plan) -> None:
        """A new plan is on its way to the stages; answers pause unless it keeps their stages."""
        self.unplannable = ""
        self.pipeline.cannot_plan("")  # a paused answer waits for this plan, however long it loads
        if not self.pipeline.keeps(plan):
            self.pipeline.suspend(f"the room was planned again (v{plan.version})")

    def cannot_plan(self, reason: str) -> None:
        self.unplannable = reason
        self.pipeline.cannot_plan(reason)
        self._changed.set()

    def node_lost(self, node_id: str, reason: str) -> None:
        self.pipeline.node_lost(node_id, reason)

    def close(self, reason: str) -> None:
        self.pipeline.close(reason)

    @property
    def ready(self) -> bool:
        """Every stage has loaded the current plan, and answers are taken."""
        return self.pipeline.ready

    async def wait_ready(self, timeout_s: float | None = None, *, fail_fast: bool = False) -> Pipeline:
        """The pipeline once every stage has loaded the current plan; ``NotReadyError`` saying what
        is missing if that takes longer than ``timeout_s`` (default: the configured wait), or at
        once with ``fail_fast`` when the room tried to plan and could not (a node joining could
        still fix that, so others wait)."""
        try:
            async with asyncio.timeout(self.config.ready_timeout_s if timeout_s is None else timeout_s):
                while not self.ready:
                    if self.pipeline.closed:
                        raise NotReadyError("the host closed the room")
                    if fail_fast and self.unplannable:
                        raise NotReadyError(self.unplannable)
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise NotReadyError(self.unplannable or self.why_not_ready()) from None
        return self.pipeline

    # -- prompts and sampling ---------------------------------------------------------------

    def prompt_ids(
        self, prompt: str | Sequence[int] | Messages, *, chat: bool = False, system: str | None = None
    ) -> list[int]:
        """Token ids of text (wrapped in the chat template with ``chat``), of chat messages, or
        checked ids; ``PromptError`` says what is wrong with it."""
        tokenizer = self.tokenizer
        try:
            if isinstance(prompt, str):
                return encode_prompt(tokenizer, prompt, chat=chat, system=system)
            items = list(prompt)
            if items and all(isinstance(m, dict) for m in items):
                return tokenizer.apply_chat_template_ids(items, add_generation_prompt=True)  # type: ignore[arg-type]
        except TokenizerError as exc:
            raise PromptError(str(exc)) from exc
        ids = [int(t) for t in items]  # type: ignore[arg-type]
        if ids and (max(ids) >= tokenizer.vocab_size or min(ids) < 0):
            raise PromptError(f"prompt token ids must be in [0, {tokenizer.vocab_size}), the vocabulary size")
        return ids

    def params(self, sampling: Sampling, prompt_tokens: int) -> SamplingParams:
        """The model's defaults under the request's choices; ``max_tokens`` left open (or too large)
        becomes what the context has room for. ``PromptError`` when it has none."""
        room = self.config.max_seq - prompt_tokens
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens; this room's context holds {self.config.max_seq}, "
                "which leaves no room for an answer"
            )
        wanted = sampling.max_tokens
        try:
            return self.defaults.resolve(sampling, min(wanted, room) if wanted else room)
        except InvalidSamplingParams as exc:
            raise PromptError(str(exc)) from exc

    # -- answers ----------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | Sequence[int] | Messages,
        sampling: Sampling,
        on_text: OnText | None = None,
        *,
        chat: bool = False,
        system: str | None = None,
        task_id: str | None = None,
        timeout_s: float | None = None,
        speculate: str = "",
    ) -> GenerationResult:
        """One answer through the room, once it is ready; ``speculate`` (off, ngram, draft)
        overrides the room's drafting for it."""
        pipeline = await self.wait_ready(timeout_s)
        ids = self.prompt_ids(prompt, chat=chat, system=system)
        params = self.params(sampling, len(ids))
        return await pipeline.generate(ids, params, on_text, task_id=task_id, speculate=speculate)

    async def serve(self, peer: str, request: GenerateRequest) -> None:
        """Answer a remote client's generate-request: text in order, then generate-done."""
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        async def stream() -> None:
            # Pieces that piled up while the last one was written go as one message: under many
            # answers the host sends fewer, larger ones instead of falling behind.
            ended = False
            while not ended:
                text = [await pieces.get()]
                while not pieces.empty():
                    text.append(pieces.get_nowait())
                ended = None in text
                joined = "".join(p for p in text if p is not None)
                if joined:
                    await self._send_quietly(peer, GenerateText(request.request_id, joined))

        tag = request.request_id[:8]
        async with asyncio.TaskGroup() as tg:
            tg.create_task(stream())
            try:
                pipeline = await self.wait_ready(request.wait_s or None)
                prompt = list(request.prompt_ids) if request.prompt_ids else request.prompt
                ids = self.prompt_ids(prompt, chat=request.chat, system=request.system or None)
                params = self.params(request.sampling, len(ids))
                self.report(f"request {tag}: started, {len(ids)} prompt tokens")
                result = await pipeline.generate(
                    ids, params, pieces.put_nowait, task_id=request.request_id, speculate=request.speculate
                )
                self.report(f"request {tag}: {len(result.tokens)} tokens, {result.tok_s:.1f} tok/s, {result.finish_reason}")
                done = GenerateDone(
                    request.request_id,
                    result.finish_reason,
                    result.text,
                    tuple(result.tokens),
                    tuple(result.prompt_ids),
                    result.prefill_s,
                    result.decode_s,
                    stages=tuple(pipeline.describe()),
                    **_speculation_fields(result),
                )
            except PeerpipeError as exc:
                self.report(f"request {tag}: failed: {exc}")
                done = GenerateDone(request.request_id, "error", "", (), (), 0.0, 0.0, error=str(exc)[:4000])
            pieces.put_nowait(None)
        await self._send_quietly(peer, done)

    async def _send_quietly(self, peer: str, message: GenerateText | GenerateDone) -> None:
        # A client that left is not an error of ours: its answer is cancelled by the data plane.
        try:
            await self.send(peer, message)
        except PeerpipeError as exc:
            log.info("client %s is gone: %s", peer[:8], exc)

    @property
    def speculator(self) -> Speculator:
        return self.pipeline.speculator

    def cancel(self, task_id: str) -> bool:
        return self.pipeline.cancel(task_id)

    def active_tasks(self) -> list[Task]:
        return self.pipeline.active_tasks()

    def measured_ms(self) -> float:
        """Mean ms per decoded token of the last answers that finished (a few tokens at least);
        0 before any has."""
        paces = [
            1e3 / t.tok_s
            for t in self.pipeline.tasks.values()
            if not t.active and not t.error and len(t.tokens) >= 4 and t.tok_s > 0
        ][-RECENT_ANSWERS:]
        return sum(paces) / len(paces) if paces else 0.0

    def task_infos(self) -> tuple[TaskInfo, ...]:
        """The answers running now, as the room view shows them."""
        return tuple(
            TaskInfo(t.task_id, t.status.value, t.prompt_tokens, len(t.tokens), t.tok_s, t.error[:4000])
            for t in self.active_tasks()
        )


def _speculation_fields(result: GenerationResult) -> dict[str, str | int]:
    spec = result.speculation
    if spec is None:
        return {}
    return {"speculate": spec.mode, "steps": spec.steps, "drafted": spec.drafted, "accepted": spec.accepted}
