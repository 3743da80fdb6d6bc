"""The host's side of distributed inference: one task per request, run through the stages.

The host tokenizes, sends the prompt to the first stage, and waits for the last stage's token;
each next token goes to the first stage again. Hidden states never pass through the host. Every
wait has a timeout; a compute-error from any stage, or a stage leaving the room, fails the task
with that stage and reason; a task that ends for any reason frees its KV cache on every stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence

import torch

from peerpipe.engine.decode import Decoding, GenerationResult, OnText, check_prompt
from peerpipe.engine.errors import CacheError
from peerpipe.engine.sampling import SamplingParams
from peerpipe.engine.tokenizer import Tokenizer
from peerpipe.inference.errors import TaskFailedError
from peerpipe.inference.tasks import Task, TaskStatus
from peerpipe.inference.wire import sampling_to_wire, to_wire
from peerpipe.protocol import Cancel, ComputeError, ComputeRequest, ComputeResult, Plan, SessionSpec
from peerpipe.room import Send

KEEP_FINISHED = 256


class _Cancelled(Exception):
    pass


class Pipeline:
    def __init__(
        self,
        plan: Plan,
        *,
        host_id: str,
        send: Send,
        tokenizer: Tokenizer,
        sessions: int,
        max_seq: int,
        names: dict[str, str] | None = None,
        step_timeout_s: float = 60.0,
        prefill_timeout_s: float = 300.0,
    ) -> None:
        self.plan = plan
        self.host_id = host_id
        self.send = send
        self.tokenizer = tokenizer
        self.max_seq = max_seq
        self.names = names or {}
        self.step_timeout_s = step_timeout_s
        self.prefill_timeout_s = prefill_timeout_s
        self.tasks: dict[str, Task] = {}
        self._slots = asyncio.Semaphore(sessions)
        self._waiting: dict[str, asyncio.Future[int]] = {}
        self._closed: str = ""

    @property
    def stage_nodes(self) -> list[str]:
        return [s.node_id for s in self.plan.stages]

    @property
    def closed(self) -> bool:
        """The plan changed or a stage left: this pipeline takes no more work."""
        return bool(self._closed)

    @property
    def local(self) -> bool:
        """Every layer on the host: no network on the data path."""
        return self.stage_nodes == [self.host_id]

    def describe(self) -> list[str]:
        return [f"{self.names.get(s.node_id, s.node_id[:8])}[{s.start},{s.end})" for s in self.plan.stages]

    # -- messages from the stages -----------------------------------------------------------

    def deliver(self, peer: str, message: ComputeResult | ComputeError) -> None:
        waiter = self._waiting.get(message.task_id)
        if waiter is None or waiter.done():
            return
        if isinstance(message, ComputeError):
            waiter.set_exception(TaskFailedError(message.error))
        elif peer != self.stage_nodes[-1]:
            waiter.set_exception(TaskFailedError(f"a token came from {peer[:8]}, not from the last stage"))
        else:
            waiter.set_result(int(message.output_tensor.to_numpy().reshape(-1)[0]))

    def node_lost(self, node_id: str, reason: str) -> None:
        """A stage left the room: every task in flight needs it, so every one fails."""
        if node_id not in self.stage_nodes:
            return
        name = self.names.get(node_id, node_id[:8])
        self.close(f"stage {name} left the room: {reason}")

    def close(self, reason: str) -> None:
        """Stop taking work (the plan changed); tasks in flight fail with ``reason``."""
        self._closed = reason
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(TaskFailedError(reason))

    def cancel(self, task_id: str) -> bool:
        waiter = self._waiting.get(task_id)
        task = self.tasks.get(task_id)
        if task is None or not task.active:
            return False
        task.status = TaskStatus.CANCELLED
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Cancelled())
        return True

    def active_tasks(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.active]

    # -- running a task ---------------------------------------------------------------------

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: OnText | None = None,
        *,
        task_id: str | None = None,
    ) -> GenerationResult:
        prompt = list(prompt_ids)
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
            return await self._run(task, decoding)

    async def _run(self, task: Task, decoding: Decoding) -> GenerationResult:
        params, prompt = decoding.params, decoding.prompt
        first = self.stage_nodes[0]
        task.status, task.started = TaskStatus.PREFILL, time.monotonic()
        task.tokens = decoding.tokens  # the task's view of the answer, for status and the dashboard
        try:
            history = to_wire(torch.tensor(prompt, dtype=torch.long)) if params.repetition_penalty != 1.0 else None
            spec = SessionSpec(sampling_to_wire(params), history)
            ids = torch.tensor([prompt], dtype=torch.long)
            request = ComputeRequest(task.task_id, to_wire(ids), task.task_id, self.plan.version, 0, spec)
            token = await self._step(task, first, request, self.prefill_timeout_s)
            task.first_token, task.status = time.monotonic(), TaskStatus.DECODING
            while decoding.push(token):
                if task.status is TaskStatus.CANCELLED:  # cancelled while no step was in flight
                    raise _Cancelled
                ids = torch.tensor([[token]], dtype=torch.long)
                request = ComputeRequest(task.task_id, to_wire(ids), task.task_id, self.plan.version, decoding.next_position)
                token = await self._step(task, first, request, self.step_timeout_s)
            task.status = TaskStatus.DONE
        except _Cancelled:
            decoding.finish("cancelled")
        except TaskFailedError as exc:
            task.status, task.error = TaskStatus.FAILED, str(exc)
            raise
        except Exception as exc:  # e.g. the first stage's connection broke while sending
            task.status, task.error = TaskStatus.FAILED, f"{type(exc).__name__}: {exc}"
            raise TaskFailedError(task.error) from exc
        finally:
            task.finished = time.monotonic()
            if task.active:  # the caller's coroutine was cancelled: never leave a task "running"
                task.status = TaskStatus.CANCELLED
            await self._free(task.task_id)
        return decoding.result()

    async def _step(self, task: Task, first: str, request: ComputeRequest, timeout_s: float) -> int:
        """Send one step to the first stage and wait for the last stage's token."""
        if self._closed:
            raise TaskFailedError(self._closed)
        # Armed before sending: an answer (or an error) may arrive while the send still waits.
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[task.task_id] = waiter
        try:
            async with asyncio.timeout(timeout_s):
                await self.send(first, request)
                return await waiter
        except TimeoutError:
            raise TaskFailedError(
                f"no token within {timeout_s:g} s from the pipeline {' -> '.join(self.describe())}"
            ) from None
        finally:
            self._waiting.pop(task.task_id, None)

    async def _free(self, task_id: str) -> None:
        """Tell every stage to drop the session (best effort: a stage that left has nothing to free)."""
        for node in dict.fromkeys(self.stage_nodes):
            with contextlib.suppress(Exception):
                await self.send(node, Cancel(task_id))

    def _forget_finished(self) -> None:
        finished = [t for t in self.tasks.values() if not t.active]
        for task in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.tasks[task.task_id]
