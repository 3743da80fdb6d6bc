"""The host's side of distributed inference: every answer, run through whatever plan the room has.

The host tokenizes, sends the prompt to the first stage, and waits for the last stage's token;
each next token goes to the first stage again. Hidden states never pass through the host.

Answers outlive plans. When a stage is lost (its connection drops, the room plans again without
it, or a step stalls past the stall timeout) the answers it held pause: once the room has a plan
again they replay, prefilling prompt and emitted tokens on the new stages, and go on. A seeded
answer draws by (seed, position), so replay changes no token. A plan with the same stages as
before disturbs nothing. Answers fail only for what replay cannot mend: a stage's own compute
error, a room that cannot hold the model any more, or no plan within the recovery timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from peerpipe.engine.decode import Decoding, GenerationResult, OnText, check_prompt
from peerpipe.engine.errors import CacheError
from peerpipe.engine.sampling import SamplingParams
from peerpipe.engine.tokenizer import Tokenizer
from peerpipe.inference import trace
from peerpipe.inference.errors import TaskFailedError
from peerpipe.inference.passing import Ahead, Pending, Token
from peerpipe.inference.prefill import prefill_requests
from peerpipe.inference.rounds import Rounds
from peerpipe.inference.speculation import AnswerDrafts, Speculator
from peerpipe.inference.tasks import (
    Cancelled,
    PlanLost,
    RecoveryStats,
    Task,
    TaskStatus,
    Timeouts,
    stage_spans,
)
from peerpipe.inference.wire import ids_to_wire, release_shared
from peerpipe.logs import Report, log_reporter
from peerpipe.protocol import Cancel, ComputeError, ComputeRequest, ComputeResult, Plan
from peerpipe.room import LINK_ERRORS, Send
from peerpipe.transport.shared_memory import SharedMemoryError

log = logging.getLogger(__name__)
KEEP_FINISHED = 256
MAX_RECOVERIES = 8  # per answer: a room that keeps failing under it fails it in the end
# Without a stall timeout of its own, a step stalls past this many predicted token times (and
# never sooner than MIN_STALL_S: a loaded machine has hiccups that are not failures).
STALL_STEPS = 50
MIN_STALL_S = 5.0
# Told which stages did not answer in time; finds out which of them are gone (the cluster probes).
OnStall = Callable[[list[str]], Awaitable[None]]


def _push(decoding: Decoding, tokens: list[int]) -> bool:
    """Push ``tokens`` (emptied) until one ends the answer; True while it goes on."""
    for token in tokens:
        if not decoding.push(token):
            break
    tokens.clear()
    return decoding.finish_reason is None


class Pipeline:
    def __init__(
        self,
        *,
        host_id: str,
        send: Send,
        tokenizer: Tokenizer,
        sessions: int,
        max_seq: int,
        timeouts: Timeouts | None = None,
        on_stall: OnStall | None = None,
        report: Report | None = None,
        speculator: Speculator | None = None,
        prefill_chunk: int | None = None,
    ) -> None:
        self.host_id = host_id
        self.prefill_chunk = prefill_chunk  # 0: prompts go whole; None: chunks where tokens are slow
        self.speculator = speculator or Speculator()
        self.send = send
        self.tokenizer = tokenizer
        self.max_seq = max_seq
        self.timeouts = timeouts or Timeouts()
        self.on_stall = on_stall
        self.report = report or log_reporter(log)
        self.plan: Plan | None = None
        self.names: dict[str, str] = {}
        self.tasks: dict[str, Task] = {}
        self.recovery = RecoveryStats()
        self._slots = asyncio.Semaphore(sessions)
        self.running = 0  # answers past the wait for a session
        # Each task's step in flight: its token's future, and the (plan version, position) it was
        # sent with, so a late answer to a step given up on (after a failover) is not taken.
        self._waiting: dict[str, tuple[asyncio.Future[Token], int, int]] = {}
        self._ahead = Ahead(send)  # next steps sent before their input token was computed, tokens read later
        self._changed = asyncio.Event()  # a plan came, went, or cannot be made
        self._closed = ""  # final: this pipeline takes no more work
        self._unplannable, self._unplannable_at = "", 0.0  # why the room cannot hold the model now, since when
        # Answers on stages that take turns on one device go in step (PEERPIPE_LOCKSTEP=0: not).
        self.rounds = Rounds() if os.environ.get("PEERPIPE_LOCKSTEP", "1") != "0" else None

    # -- plans ------------------------------------------------------------------------------

    @property
    def stage_nodes(self) -> list[str]:
        return [s.node_id for s in self.plan.stages] if self.plan else []

    @property
    def ready(self) -> bool:
        return self.plan is not None and not self._closed

    @property
    def closed(self) -> bool:
        return bool(self._closed)

    @property
    def local(self) -> bool:
        """Every layer on the host: no network on the data path."""
        return self.stage_nodes == [self.host_id]

    def describe(self) -> list[str]:
        stages = self.plan.stages if self.plan else ()
        return [f"{self.names.get(s.node_id, s.node_id[:8])}[{s.start},{s.end})" for s in stages]

    def keeps(self, plan: Plan) -> bool:
        """Whether ``plan`` has exactly the stages answers run on now (then it disturbs nothing)."""
        return self.plan is not None and stage_spans(self.plan) == stage_spans(plan)

    def use_plan(self, plan: Plan, names: dict[str, str]) -> None:
        """Every stage has loaded ``plan``: answers run (or resume) on it."""
        if not self.keeps(plan):
            self.speculator.reset_costs()
        self.plan, self.names, self._unplannable = plan, names, ""
        self._changed.set()

    def suspend(self, reason: str) -> None:
        """The current plan is gone: answers pause (steps in flight end) until the next one."""
        if self.plan is None:
            return
        self.plan = None
        running = [t for t in self.tasks.values() if t.active and t.status is not TaskStatus.QUEUED]
        if running:
            self.recovery.failovers += 1
            self.report(f"recovering: {reason}; replaying {len(running)} answer(s) once the room has a plan")
        self._fail_waiters(PlanLost(reason))
        self._changed.set()

    def cannot_plan(self, reason: str) -> None:
        """The room cannot hold the model now: paused answers fail with ``reason`` ("": it can again)."""
        self._unplannable_at = self._unplannable_at if self._unplannable else time.monotonic()
        self._unplannable = reason
        self._changed.set()

    def node_lost(self, node_id: str, reason: str) -> None:
        if node_id in self.stage_nodes:
            self.suspend(f"stage {self.names.get(node_id, node_id[:8])} left the room: {reason}")

    def close(self, reason: str) -> None:
        """Take no more work; answers in flight or paused fail with ``reason``."""
        self._closed = reason
        self.plan = None
        self._fail_waiters(TaskFailedError(reason))
        self._changed.set()

    def _fail_waiters(self, error: Exception) -> None:
        for waiter, _, _ in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._ahead.fail(error)

    async def _wait_plan(self, task: Task, timeout_s: float) -> Plan:
        """The current plan, once there is one; ``TaskFailedError`` for what will not mend."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    if task.status is TaskStatus.CANCELLED:
                        raise Cancelled
                    if self._closed:
                        raise TaskFailedError(self._closed)
                    if self.plan is not None:
                        return self.plan
                    # An answer under way waits a while for a node to come back; a new one is told now.
                    left = self._unplannable_at + self.timeouts.rejoin_s - time.monotonic() if task.tokens else 0.0
                    if self._unplannable and left <= 0:
                        raise TaskFailedError(f"the room cannot hold the model now: {self._unplannable}")
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(left if self._unplannable else None):
                            await self._changed.wait()
        except TimeoutError:
            raise TaskFailedError(f"the room had no plan again within {timeout_s:g} s") from None

    # -- messages from the stages -----------------------------------------------------------

    def deliver(self, peer: str, message: ComputeResult | ComputeError) -> None:
        step = self._waiting.get(message.task_id)
        live = step is not None and step[1:] == (message.plan_version, message.start_pos) and not step[0].done()
        waiter = step[0] if step is not None and live else self._ahead.waiter(message)  # (tokens ahead)
        if waiter is None:
            return  # no step waits, or this answers one given up on
        ahead = isinstance(message, ComputeResult) and message.ahead is not None
        trace.mark("ahead" if ahead else "token", message.task_id, message.start_pos)  # (ahead: read later)
        if self.rounds is not None and not ahead:  # (an ahead token lands once read, as _step ends)
            self.rounds.landed(message.task_id)
        if isinstance(message, ComputeError):
            waiter.set_exception(TaskFailedError(message.error))
        elif peer != (self.stage_nodes or [peer])[-1]:
            waiter.set_exception(TaskFailedError(f"a token came from {peer[:8]}, not from the last stage"))
        elif ahead:
            waiter.set_result(self._ahead.pending(message))  # passed on, then read (_read_ahead)
        else:
            waiter.set_result([int(t) for t in message.output_tensor.to_numpy().reshape(-1)])

    def cancel(self, task_id: str) -> bool:
        step = self._waiting.get(task_id)
        task = self.tasks.get(task_id)
        if task is None or not task.active:
            return False
        task.status = TaskStatus.CANCELLED
        if step is not None and not step[0].done():
            step[0].set_exception(Cancelled())
        self._changed.set()  # a paused answer stops waiting
        return True

    def step_in_flight(self, task_id: str) -> int | None:
        """The position of the answer's step that waits for its token, if one does."""
        step = self._waiting.get(task_id)
        return None if step is None else step[2]

    def active_tasks(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.active]

    # -- running an answer ------------------------------------------------------------------

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: OnText | None = None,
        *,
        task_id: str | None = None,
        speculate: str = "",
    ) -> GenerationResult:
        """One answer; ``speculate`` (off, ngram, draft) overrides the room's drafting for it."""
        prompt = list(prompt_ids)
        mode = self.speculator.mode_for(speculate)
        try:
            check_prompt(prompt, self.max_seq, "the room")
        except CacheError as exc:
            raise TaskFailedError(str(exc)) from None
        if self._closed:
            raise TaskFailedError(self._closed)
        task = Task(task_id or uuid.uuid4().hex, len(prompt))
        self.tasks[task.task_id] = task
        self._forget_finished()
        async with self._slots:
            # Made once a session is free: waiting for one is not prefill time.
            decoding = Decoding(prompt, params, self.tokenizer, max_seq=self.max_seq, on_text=on_text)
            if task.status is TaskStatus.CANCELLED:
                decoding.finish("cancelled")
                return decoding.result()
            drafts = self.speculator.for_answer(mode, decoding)
            self.running += 1
            try:
                result = await self._run(task, decoding, drafts)
            finally:
                self.running -= 1
                if drafts is not None:
                    drafts.close()
            return dataclasses.replace(result, speculation=drafts.stats) if drafts is not None else result

    async def _run(self, task: Task, decoding: Decoding, drafts: AnswerDrafts | None = None) -> GenerationResult:
        task.status, task.started = TaskStatus.PREFILL, time.monotonic()
        task.tokens = decoding.tokens  # the task's view of the answer, for status and the dashboard
        on: tuple[tuple[str, int, int], ...] | None = None  # the stages holding this answer's KV
        touched: set[str] = set()  # every node that may hold a session of it, to free at the end
        last_token_at = task.started
        stalled_at: float | None = None  # when the answer's last token came, while it is paused
        recoveries = 0
        # The last step's token, when the next step went out before it was pushed: its text is
        # made and streamed while the stages compute (the host's turn, off the token's path).
        held: list[int] = []
        try:
            while decoding.finish_reason is None:
                plan = self.plan
                if held and (task.status is TaskStatus.CANCELLED or plan is None or stage_spans(plan) != on):
                    _push(decoding, held)  # a replay's prompt, or the answer cancelled, has it
                    continue
                if task.status is TaskStatus.CANCELLED:  # cancelled while no step was in flight
                    raise Cancelled
                sent: list[int] = []
                began = time.perf_counter()
                waiter = None
                if plan is None or stage_spans(plan) != on:
                    # A new answer, or one whose stages changed: (re)build its KV caches.
                    self._ahead.forget(task.task_id)
                    plan = await self._wait_plan(task, self.timeouts.recover_s)
                    *chunks, request = self._prefill(task, decoding, plan)
                    timeout = self.timeouts.prefill_s
                    on = stage_spans(plan)
                    touched.update(node for node, _, _ in on)
                else:
                    chunks = []
                    timeout = self.timeouts.stall_s or max(MIN_STALL_S, STALL_STEPS * plan.predicted_ms / 1e3)
                    at = decoding.next_position + len(held)
                    if (passed := self._ahead.take(task.task_id, plan.version, at)) is not None:
                        request, waiter = passed  # on its way already (tokens ahead)
                    else:
                        sent = await drafts.propose(decoding) if drafts is not None else []
                        ids = [held[-1] if held else decoding.tokens[-1], *sent]
                        request = ComputeRequest(
                            task.task_id, ids_to_wire(ids, (1, len(ids))), task.task_id, plan.version, at, drafts=tuple(sent)
                        )
                try:
                    meanwhile = functools.partial(_push, decoding, held) if held else None
                    ahead = decoding if drafts is None else None
                    tokens = await self._step(task, plan, request, timeout, chunks, meanwhile, ahead, waiter)
                except PlanLost as exc:
                    recoveries += 1
                    if recoveries > MAX_RECOVERIES:
                        raise TaskFailedError(f"gave up after {MAX_RECOVERIES} recoveries: {exc}") from None
                    task.status, on = TaskStatus.RECOVERING, None
                    stalled_at = last_token_at
                    continue
                if decoding.finish_reason is not None:
                    break  # the held token's text completed a stop string: this step is not wanted
                if not 1 <= len(tokens) <= len(request.drafts) + 1:
                    raise TaskFailedError(
                        f"the last stage returned {len(tokens)} tokens for a step of {len(request.drafts)} drafts"
                    )
                if drafts is not None and request.start_pos > 0 and not chunks:  # a decode step, not a prompt
                    drafts.observe(sent, tokens, time.perf_counter() - began)
                last_token_at = time.monotonic()
                if stalled_at is not None:
                    self.recovery.stalls += 1
                    self.recovery.stall_s += last_token_at - stalled_at
                    stalled_at = None
                if task.first_token is None:
                    task.first_token = last_token_at
                task.status = TaskStatus.DECODING
                if drafts is None and len(tokens) == 1 and decoding.goes_on_after(tokens[0]):
                    held = tokens
                else:
                    yielded, before = len(tokens), len(decoding.tokens)
                    _push(decoding, tokens)  # a stop or the budget inside a kept block ends it there
                    if drafts is not None and (cut := yielded - (len(decoding.tokens) - before)):
                        drafts.unused(cut)
            task.status = TaskStatus.DONE
        except Cancelled:
            decoding.finish("cancelled")
        except TaskFailedError as exc:
            task.status, task.error = TaskStatus.FAILED, str(exc)
            raise
        except Exception as exc:  # e.g. the first stage's connection broke while sending
            task.status, task.error = TaskStatus.FAILED, f"{type(exc).__name__}: {exc}"
            raise TaskFailedError(task.error) from exc
        finally:
            task.finished = time.monotonic()
            if self.rounds is not None:
                self.rounds.forget(task.task_id)
            self._ahead.forget(task.task_id)
            if task.active:  # the caller's coroutine was cancelled: never leave a task "running"
                task.status = TaskStatus.CANCELLED
            await self._free(task.task_id, touched)
        return decoding.result()

    def _prefill(self, task: Task, decoding: Decoding, plan: Plan) -> list[ComputeRequest]:
        if decoding.tokens:
            self.recovery.replayed_tokens += len(decoding.history)
        return prefill_requests(task.task_id, decoding.history, decoding.params, plan, self.prefill_chunk)

    async def _step(
        self, task: Task, plan: Plan, request: ComputeRequest, timeout_s: float, chunks: list[ComputeRequest],
        meanwhile: Callable[[], bool] | None = None, ahead: Decoding | None = None,
        waiter: asyncio.Future[Token] | None = None,
    ) -> list[int]:
        """Send one step (after the ``partial`` chunks of its prompt, which answer nothing) to the
        first stage and wait for the last stage's tokens (one, or the drafts it kept and one more).
        ``meanwhile`` runs once the step is sent; if it says the answer is over, no token is awaited.
        ``ahead``: the answer, if its next step may go before this token is computed (``waiter``)."""
        sending = waiter is None  # (else it went ahead, armed then)
        # Armed before sending: an answer (or an error) may arrive while the send still waits.
        waiter = waiter or asyncio.get_running_loop().create_future()
        self._waiting[task.task_id] = (waiter, request.plan_version, request.start_pos)
        # A decode step on stages that share one device waits for the other answers' (rounds.py).
        lockstep = sending and request.start_pos > 0 and not chunks and (plan.lanes or len(plan.stages)) == 1
        rounds = self.rounds if lockstep else None
        try:
            if rounds is not None:  # (its own bounded wait: not the step's time)
                await rounds.join(task.task_id)
                rounds.sent(task.task_id)
            async with asyncio.timeout(timeout_s):
                try:
                    if sending:
                        trace.mark("send", request.task_id, request.start_pos)
                        for message in (*chunks, request):
                            await self.send(plan.stages[0].node_id, message)
                        trace.mark("sent", request.task_id, request.start_pos)
                except LINK_ERRORS as exc:  # the first stage is gone: its PeerLeft follows
                    raise PlanLost(f"cannot reach the first stage: {exc}") from None
                if meanwhile is not None:
                    # A first stage in this process has the step queued: it takes it (and
                    # launches it) in this turn of the loop, before the last token's text is made.
                    await asyncio.sleep(0)
                    if not meanwhile():
                        return []
                got = await waiter
                return got if isinstance(got, list) else await self._read_ahead(task, plan, ahead, got)
        except TimeoutError:
            stages = [s.node_id for s in plan.stages]
            if self.on_stall is not None:
                await self.on_stall(stages)  # the cluster drops those that no longer answer
            raise PlanLost(f"no token within {timeout_s:g} s from {' -> '.join(self.describe()) or 'the stages'}") from None
        finally:
            self._waiting.pop(task.task_id, None)
            if rounds is not None:
                rounds.landed(task.task_id)

    async def _read_ahead(self, task: Task, plan: Plan, decoding: Decoding | None, got: Pending) -> list[int]:
        """A token sent ahead of its computation (inference/passing.py): the next step goes on first
        where nothing can say the answer ends yet (a lone answer, same plan, budget left)."""
        result = got.result
        goes = decoding is not None and decoding.finish_reason is None and len(decoding.tokens) + 1 < decoding.budget
        goes = goes and task.status is not TaskStatus.CANCELLED and self.plan is plan and self.running <= 1
        if not (goes and await self._ahead.send_next(plan.stages[0].node_id, plan.version, result)) and result.ahead:
            release_shared(result.ahead)  # (one still pending is left to the sender's ring)
        try:
            return await self._ahead.read(got)
        except SharedMemoryError as exc:
            raise PlanLost(f"the last stage's token is lost: {exc}") from None

    async def _free(self, task_id: str, nodes: set[str]) -> None:
        """Tell every stage to drop the session (best effort: a stage that left has nothing to free)."""
        for node in sorted(nodes):
            with contextlib.suppress(Exception):
                await self.send(node, Cancel(task_id))

    def _forget_finished(self) -> None:
        finished = [t for t in self.tasks.values() if not t.active]
        for task in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.tasks[task.task_id]
