"""One node's pipeline stage: compute requests in, hidden states (or sampled tokens) out.

Requests from every session queue up; the worker takes all that are waiting, runs the one-token
decode steps of different sessions as one batched forward (continuous batching) and each prompt
on its own, then sends each result on: hidden states to the next stage, or, on the last stage,
the sampled token id to the host. Each session keeps its own KV-cache slot until the host
cancels it. The forward runs in a worker thread, so heartbeats and transfers keep flowing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time

import torch

from peerpipe.compute import computing, one_core, run_compute
from peerpipe.engine.cuda_graphs import GraphedDecoder
from peerpipe.engine.kvcache import KVCache
from peerpipe.engine.model import Stage
from peerpipe.engine.sampling import Sampler
from peerpipe.inference import tokens_ahead, trace
from peerpipe.inference.gpu_rows import GpuSteps, GpuTiming, RingWriter, rows_written
from peerpipe.inference.stage_sessions import RequestError, Session, StageStats, draw, prompt_groups, sample
from peerpipe.inference.step_clock import StepClock
from peerpipe.inference.wire import (
    WIRE_NAMES,
    PinnedRows,
    encode_hidden,
    from_wire,
    ids_to_wire,
    release_shared,
    row_bytes,
)
from peerpipe.protocol import (
    Cancel,
    ComputeBatch,
    ComputeError,
    ComputeRequest,
    ComputeResult,
    Message,
    TensorData,
)
from peerpipe.room import Send
from peerpipe.transport.shared_memory import Ring

log = logging.getLogger(__name__)
# Tasks cancelled recently: a request of theirs still on its way from an earlier stage is dropped
# rather than given a fresh slot nobody would free.
_FORGET_AFTER = 4096
_CPU = torch.device("cpu")
GATHER_S = 0.001  # how long a stage waits for the rest of a decode batch
BATCH_BYTES = 1 << 20  # a batch's outputs up to this size go to the next node in one compute-batch


def _nbytes(step: ComputeRequest | ComputeResult) -> int:
    return step.input_tensor.nbytes if isinstance(step, ComputeRequest) else step.output_tensor.nbytes


class StageServer:
    def __init__(
        self,
        stage: Stage,
        cache: KVCache,
        *,
        label: str,
        next_hop: str | None,
        host_id: str,
        send: Send,
        max_batch: int = 64,
        stats: StageStats | None = None,
        cuda_graphs: bool | None = None,
        micro_batches: int = 1,
        wire: str = "",
    ) -> None:
        self.stage, self.cache = stage, cache
        self.label = label  # e.g. "node-b layers [8, 16)", for error messages
        self.next_hop = next_hop  # None: this is the last stage
        self.host_id = host_id
        self.send = send
        self.max_batch = max_batch
        self.micro_batches = max(1, micro_batches)  # how many stages compute at once (Plan.lanes)
        self.wire = wire  # the format of the hidden states this stage sends on (the plan's)
        self._dtype = next(stage.parameters()).dtype
        self.sessions: dict[str, Session] = {}
        self._queue: asyncio.Queue[ComputeRequest | Cancel] = asyncio.Queue()
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._sampler = Sampler()
        self.stats = stats or StageStats()
        self._changed = asyncio.Event()  # set when a session opens or closes
        # On CUDA, decode steps replay captured graphs, as the local engine's do (None: on CUDA).
        use_graphs = cache.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphed = GraphedDecoder(stage, cache, pad_batches=True) if use_graphs else None
        # To a next stage on this machine, hidden states go through shared memory (plan wire "local").
        self._ring: Ring | None = None
        # A GPU stage's one-answer steps go into the ring before its GPU has run them (gpu_rows.py).
        self._writer: RingWriter | None = None
        self._gpu_steps = GpuSteps() if self._graphed is not None else None
        self._early_rows = os.environ.get("PEERPIPE_EARLY_ROWS", "1") != "0"
        self._timed_on_gpu = False  # whether the last forward's time is the GPU's, read later
        self._ahead: TensorData | None = None  # the last GPU forward's token ahead, for the first stage (tokens_ahead.py)
        self._sends_ahead = tokens_ahead.enabled(cache.device.type == "cuda")  # (as a last stage)
        # A CPU stage on one core runs short decode steps on the event loop's thread, which would
        # only wait meanwhile: two thread hops fewer, 0.2-0.3 ms a step on the 2-core VM.
        # (Tried on every CPU node: 0.51-0.68x one node on 3 unpinned stages, against 0.79x: the
        # loop's thread grew an OpenMP team of its own, which fought the compute thread's.)
        self._inline = cache.device.type == "cpu" and one_core() and os.environ.get("PEERPIPE_INLINE", "1") != "0"
        # One decode position's input (token ids into the first stage, hidden states into the
        # others): the shape the graphs are captured for, and the one inputs take the lean path in.
        if self._graphed is None:
            self._like = torch.zeros(0)
        elif stage.is_first:
            self._like = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        else:
            self._like = torch.zeros((1, 1, stage.cfg.hidden_size), dtype=self._dtype, device=self.device)
        # PEERPIPE_LEAN_STEPS=0 sends every step through the tensor path (to compare the two).
        lean = os.environ.get("PEERPIPE_LEAN_STEPS", "1") != "0"
        self._like_dtype = WIRE_NAMES.get(self._like.dtype, "") if lean else "off"
        self._rows_out = PinnedRows()

    @property
    def graphed(self) -> bool:
        """Whether decode steps replay captured CUDA graphs."""
        return self._graphed is not None

    @property
    def device(self) -> torch.device:
        return self.cache.device

    @torch.inference_mode()
    def warm(self) -> int:
        """Capture the decode graphs this stage's batches will replay, before it serves (a
        capture met while serving would stall every answer for several steps); returns how many."""
        if self._graphed is None:
            return 0
        return self._graphed.warm_batches(min(self.max_batch, self.cache.max_slots), self._like)

    def submit(self, message: ComputeRequest | Cancel) -> None:
        self._queue.put_nowait(message)

    async def run(self) -> None:
        try:
            await self._serve()
        finally:
            if self._writer is not None:
                self._writer.close()
            if self._ring is not None:
                self._ring.close()

    def _shared_ring(self) -> Ring | None:
        """This stage's ring while its plan says "local" (a stage kept across plans may lose it)."""
        if self.wire != "local":
            return None
        if self._ring is None:
            try:
                self._ring = Ring()
            except OSError as exc:  # no shared memory after all: the hidden states go inline
                log.warning("%s: no shared memory (%s); sending hidden states on the socket", self.label, exc)
                self.wire = ""
                return None
            if self._gpu_steps is not None and self._early_rows:
                self._writer = RingWriter.try_open(self._ring, self.device, self.label)
        return self._ring

    async def _serve(self) -> None:
        held: collections.deque[ComputeRequest] = collections.deque()  # decode steps for the next round
        while True:
            if not held:
                held.append(await self._queue.get())  # type: ignore[arg-type]
            items: list[ComputeRequest | Cancel] = [*held]
            held.clear()
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            limit = self.micro_batch()
            await self._gather(items, limit)
            decode: list[ComputeRequest] = []
            verify: dict[int, list[ComputeRequest]] = {}  # drafted steps, by their positions
            prompts: list[ComputeRequest] = []
            for item in items:
                if isinstance(item, Cancel):
                    self._cancel(item.task_id)
                elif item.task_id in self._cancelled:
                    release_shared(item.input_tensor)
                elif item.drafts:
                    verify.setdefault(self._new_positions(item), []).append(item)
                elif self._new_positions(item) != 1 or item.partial:
                    prompts.append(item)  # a prompt, or a chunk of one
                elif len(decode) < limit:
                    decode.append(item)
                else:
                    held.append(item)  # the next micro-batch
            for group in prompt_groups(prompts, self._new_positions, self.max_batch):
                await self._run(group)
            for group in verify.values():  # steps of as many positions share one forward
                for at in range(0, len(group), self.max_batch):
                    await self._run(group[at : at + self.max_batch])
            if decode:
                await self._run(decode)

    async def _gather(self, items: list[ComputeRequest | Cancel], limit: int) -> None:
        """Wait a moment (at most GATHER_S) for the rest of a batch: the host sends each answer's
        next step as its token comes back, so steps of one batch arrive a few at a time."""
        steps = sum(isinstance(i, ComputeRequest) and self._new_positions(i) == 1 for i in items)
        if steps == 0 or steps >= min(limit, len(self.sessions)):
            return
        deadline = asyncio.get_running_loop().time() + GATHER_S
        while steps < min(limit, len(self.sessions)):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            try:
                item = await asyncio.wait_for(self._queue.get(), left)
            except TimeoutError:
                return
            items.append(item)
            steps += isinstance(item, ComputeRequest) and self._new_positions(item) == 1

    def micro_batch(self) -> int:
        """How many decode steps one forward takes. With S stages on S GPUs (the plan's lanes), a
        batch of a 1/S share of the sessions lets stage 1 run the next share while stage 2 runs
        this one, so all S stages work at once instead of in turn; stages that share a GPU take
        turns anyway, and take the whole batch (docs/inference.md, "Pipelined batches")."""
        share = -(-len(self.sessions) // self.micro_batches)
        return max(1, min(self.max_batch, share))

    async def wait_sessions(self, count: int, timeout_s: float) -> None:
        """Return once exactly ``count`` sessions hold a KV-cache slot here."""
        async with asyncio.timeout(timeout_s):
            while len(self.sessions) != count:
                self._changed.clear()
                await self._changed.wait()

    def _new_positions(self, request: ComputeRequest) -> int:
        # Token ids [B, n] into the first stage, hidden states [B, n, H] into the others.
        return request.input_tensor.shape[-1 if self.stage.is_first else -2]

    def _cancel(self, task_id: str) -> None:
        session = self.sessions.pop(task_id, None)
        if session is not None:
            self.cache.free(session.slot)
            self._changed.set()
        self._cancelled[task_id] = None
        if len(self._cancelled) > _FORGET_AFTER:
            self._cancelled.popitem(last=False)

    async def _run(self, requests: list[ComputeRequest]) -> None:
        ready: list[ComputeRequest] = []
        for request in requests:
            try:
                self._admit(request)
                ready.append(request)
            except RequestError as exc:
                release_shared(request.input_tensor)
                await self._fail(request, str(exc))
        if not ready:
            return
        began = time.perf_counter()
        decode = self._new_positions(ready[0]) == 1
        for request in ready:
            trace.mark("start", request.task_id, request.start_pos, self.label)
        pending = self._pending_tokens(ready) if decode and self._graphed is None else None
        if pending is not None:  # the host passes it on while this stage computes (tokens_ahead.py)
            await self._send_steps(self.host_id, [pending.result(ready[0])])
        try:
            if self._graphed is not None and (decode or ready[0].drafts):
                # A graph replay is launched in microseconds and the copy out waits for the GPU,
                # not for Python: a hop to the compute thread (and back) would cost more than it.
                outputs = await self._gpu_forward(ready)
            else:
                await rows_written([r.input_tensor for r in ready])  # a GPU stage may send them early
                if getattr(self.stage, "remote", False):
                    # A browser computes it: the wait is on the network, so it must not hold the
                    # compute thread that this process's other stages and benchmarks share.
                    outputs = await asyncio.to_thread(self._forward, ready)
                elif self._inline and decode and not computing() and self.stats.short():
                    outputs = self._forward(ready)
                else:
                    outputs = await run_compute(self._forward, ready)
        except BaseException as exc:  # the model failed: every session in the batch fails, typed, with why
            if pending is not None:
                pending.give_up()  # (the stage stopping, too: nobody may wait for its token)
            if not isinstance(exc, Exception):
                raise
            log.warning("%s: forward failed: %r", self.label, exc)
            for request in ready:
                release_shared(request.input_tensor)
                self._cancel(request.task_id)
                await self._fail(request, f"{type(exc).__name__}: {exc}")
            return
        if decode and not self._timed_on_gpu:  # prefill chunks would make the per-step figure meaningless
            self.stats.steps += 1
            self.stats.compute_s += time.perf_counter() - began
        for request in ready:
            trace.mark("end", request.task_id, request.start_pos, self.label)
        sent = [(r, o) for r, o in zip(ready, outputs, strict=True) if o is not None]  # None: a prompt goes on
        ahead, self._ahead = self._ahead, None
        if pending is not None:
            pending.fill(outputs[0])
        elif self.next_hop is None:
            results = [ComputeResult(r.task_id, out, r.plan_version, r.start_pos, ahead=ahead) for r, out in sent]
            await self._send_steps(self.host_id, results)
        else:
            requests = [
                ComputeRequest(
                    r.task_id, out, r.session_id, r.plan_version, r.start_pos, r.session,
                    layer=self.stage.end, drafts=r.drafts, partial=r.partial,
                )
                for r, out in sent
            ]
            await self._send_steps(self.next_hop, requests)
        for request, _ in sent:
            trace.mark("out", request.task_id, request.start_pos, self.label)
        if self._gpu_steps is not None:
            steps, seconds = self._gpu_steps.collect()
            self.stats.steps += steps
            self.stats.compute_s += seconds

    async def _send_steps(self, node: str, steps: list[ComputeRequest] | list[ComputeResult]) -> None:
        """A batch's steps for one node: in one compute-batch when there are several and they are
        small (big ones, prompts' hidden states, go alone: the channel cuts them into chunks)."""
        if len(steps) > 1 and sum(_nbytes(s) for s in steps) <= BATCH_BYTES:
            requests = tuple(s for s in steps if isinstance(s, ComputeRequest))
            results = tuple(s for s in steps if isinstance(s, ComputeResult))
            await self._send(node, ComputeBatch(requests, results))
            return
        for step in steps:
            await self._send(node, step)

    async def _send(self, node: str, message: Message) -> None:
        try:
            await self.send(node, message)
        except Exception as exc:  # the next hop is gone: the host learns it from the room too
            log.warning("%s: cannot send to %s: %s", self.label, node[:8], exc)

    async def _fail(self, request: ComputeRequest, error: str) -> None:
        message = f"{self.label}: {error}"[:4000]
        await self._send(self.host_id, ComputeError(request.task_id, message, request.plan_version, request.start_pos))

    def _admit(self, request: ComputeRequest) -> None:
        """Find or open the request's session and check its positions (cheap; on the loop)."""
        n_new = self._new_positions(request)
        session = self.sessions.get(request.task_id)
        if session is None:
            if request.start_pos != 0:
                raise RequestError(f"unknown session {request.task_id} at position {request.start_pos}")
            if self.cache.free_slots == 0:
                raise RequestError(f"all {self.cache.max_slots} sessions of this stage are in use")
            session = Session(self.cache.alloc())
            if self.next_hop is None:
                session.open_sampling(request.session, self.device)
            self.sessions[request.task_id] = session
            self._changed.set()
        length = self.cache.lengths[session.slot]
        if request.start_pos < length:
            self.cache.rollback(session.slot, request.start_pos)  # a replayed or redrafted step
        elif request.start_pos > length:
            raise RequestError(f"session {request.task_id} holds {length} positions, got one at {request.start_pos}")
        if request.start_pos + n_new > self.cache.max_seq:
            raise RequestError(f"session {request.task_id} would reach {request.start_pos + n_new} positions; "
                               f"this stage holds {self.cache.max_seq}")

    async def _gpu_forward(self, requests: list[ComputeRequest]) -> list:
        """A graphed decode step on the loop, fed from the frames' bytes (the lean path) and prepared
        before its rows are there; one answer's output goes on before the GPU has run it (gpu_rows.py)."""
        if requests[0].drafts or not all(self._lean(r.input_tensor) for r in requests):
            await rows_written([r.input_tensor for r in requests])
            return self._forward(requests)
        assert self._graphed is not None
        clock = StepClock(requests, self.label, self.device) if trace.on() else None
        sessions = [self.sessions[r.task_id] for r in requests]
        slots = [s.slot for s in sessions]
        starts, kv_len = self.cache.advance(slots, 1)
        with torch.inference_mode():  # (not held across the wait: other coroutines run meanwhile)
            step = self._graphed.prepare(self._like, slots, starts, kv_len)
        await rows_written([r.input_tensor for r in requests])
        ahead = self.next_hop is None and self._sends_ahead and tokens_ahead.wanted(requests[0], sessions[0])
        early = bool(len(requests) == 1 and (self.next_hop is not None or ahead) and self._shared_ring() and self._writer)
        timing = self._gpu_steps.begin() if early and self._gpu_steps else None  # (None: one not timed)
        with torch.inference_mode():
            out = self._graphed.launch(step, [row_bytes(r.input_tensor) for r in requests])
            return self._outputs(out, requests, sessions, clock, early, timing)

    @torch.inference_mode()
    def _forward(self, requests: list[ComputeRequest]) -> list:
        clock = StepClock(requests, self.label, self.device) if trace.on() else None
        sessions = [self.sessions[r.task_id] for r in requests]
        out = self._forward_tensors(requests, [s.slot for s in sessions], bool(requests[0].drafts))
        return self._outputs(out, requests, sessions, clock)

    def _outputs(self, out: torch.Tensor, requests: list[ComputeRequest], sessions: list[Session],
                 clock: StepClock | None, early: bool = False, timing: GpuTiming | None = None) -> list:
        """Hidden states to the next stage, or the last stage's tokens (``early``: before the GPU ran them)."""
        self._timed_on_gpu, self._ahead = False, None
        if clock is not None:
            clock.launched()
        if early:
            assert self._writer is not None and self._gpu_steps is not None
            sent = self._writer.send(out) if self.next_hop is not None else self._gpu_tokens(out, sessions)
            self._gpu_steps.end(timing)
            self._timed_on_gpu = timing is not None or sent is not None
            if sent is not None:
                return [sent]
        if self.next_hop is not None:
            ring = self._shared_ring()  # either way, one copy off the device for the whole batch
            lean = self.wire in ("", "local") and out.is_cuda
            hidden = self._rows_out.to_wire(out, ring) if lean else encode_hidden(out, self.wire, ring)
            if clock is not None:
                clock.ready()
            return hidden
        if requests[0].drafts:
            return [s.verify(self._sampler, r, out[i]) for i, (s, r) in enumerate(zip(sessions, requests, strict=True))]
        if all(r.partial for r in requests):  # prompts run alone: no token to draw, none to count
            return [None] * len(requests)
        ids = draw(self._sampler, out[:, -1], sessions, [int(self.cache.lengths[s.slot]) for s in sessions])
        if clock is not None:
            clock.ready()
        return [ids_to_wire([token]) for token in ids]

    def _pending_tokens(self, requests: list[ComputeRequest]) -> tokens_ahead.PendingTokens | None:  # (CPU stages)
        alone = self._sends_ahead and self.next_hop is None and len(requests) == 1
        if not (alone and tokens_ahead.wanted(requests[0], self.sessions.get(requests[0].task_id))):
            return None
        return tokens_ahead.PendingTokens.open(self._shared_ring())  # (no ring unless the plan says "local")

    def _gpu_tokens(self, logits: torch.Tensor, sessions: list[Session]) -> TensorData | None:
        """The host's copy of a token ahead (the first stage's waits in ``_ahead``), or None."""
        assert self._writer is not None
        tokens = sample(self._sampler, logits[:, -1], sessions, [int(self.cache.lengths[s.slot]) for s in sessions])
        mine, self._ahead = tokens_ahead.gpu_tokens(self._writer, tokens) or (None, None)
        return mine

    def _lean(self, data: TensorData) -> bool:
        """Whether a request's input is one decode position (inline or shared) in the stage's dtype."""
        return data.encoding in ("raw", "shm") and data.dtype == self._like_dtype and data.shape == tuple(self._like.shape)

    def _forward_tensors(self, requests: list[ComputeRequest], slots: list[int], drafted: bool) -> torch.Tensor:
        if any(r.input_tensor.encoding != "raw" for r in requests):
            # Quantized: the small int8 form crosses to the device, and is dequantized there.
            x = torch.cat([from_wire(r.input_tensor, self.device) for r in requests], dim=0)
        else:
            # Joined on the host and copied to the device once, not once per session.
            x = torch.cat([from_wire(r.input_tensor, _CPU) for r in requests], dim=0).to(self.device, non_blocking=True)
        x = x.to(torch.long) if self.stage.is_first else x.to(self._dtype)  # a 16-bit wire into an fp32 stage
        batch = self.cache.batch(slots, x.shape[1])
        if self._graphed is not None and (x.shape[1] == 1 or drafted):
            return self._graphed(x, batch)
        return self.stage(x, self.cache, batch, last_only=self.stage.is_last and not drafted)
