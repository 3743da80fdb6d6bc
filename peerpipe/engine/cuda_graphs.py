"""Decode steps replayed from captured CUDA graphs.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python the
GPU idles between them. A captured graph launches them all at once. Graphs need fixed shapes and
addresses, so each one is captured for a fixed set of slots and a KV-length *bucket* (attention
reads ``bucket`` positions, the mask hides those past each session's length) and is fed through
static input buffers.

A step of several new positions per session (a speculative verification, or a draft model fed
what it has not seen) replays a graph of a *width* bucket (2, 4, 8, ...): the columns past the
step's own are aimed at the scratch position, so they compute what nobody reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from peerpipe.engine import attention_cuda, bf16_gluon
from peerpipe.engine.kvcache import Batch, KVCache
from peerpipe.engine.model import Stage, layer_forward

MIN_BUCKET = 64
MAX_GRAPHS = 64  # each holds its own activations; batches of many slot sets would pile them up
WARM_GRAPHS = 48  # captured before a stage serves; the rest of MAX_GRAPHS is for widths and odd slots


def batch_bucket(count: int, max_slots: int) -> int:
    """The smallest power of two >= count, capped at the cache's sessions."""
    size = 1
    while size < count:
        size *= 2
    return min(size, max_slots)


def bucket_for(kv_len: int, max_seq: int) -> int:
    """The smallest power of two >= kv_len (at least MIN_BUCKET), capped at the cache length."""
    bucket = MIN_BUCKET
    while bucket < kv_len:
        bucket *= 2
    return min(bucket, max_seq)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: Tensor
    batch: Batch  # holds every static tensor the graph reads; freeing one would corrupt replays
    out: Tensor
    # The bytes that hold x, then the positions and the slots (views of them): a step fed from
    # the host fills a prefix of them in one copy.
    inputs: Tensor
    at_positions: int
    at_slots: int


def _layout(rows: int, width: int, row_bytes: int) -> tuple[int, int, int]:
    """Where a graph's positions and slots start in its input bytes (after its rows, 64-byte
    aligned), and how many bytes there are in all."""
    at_positions = -(-rows * width * row_bytes // 64) * 64
    at_slots = at_positions + 8 * rows * width
    return at_positions, at_slots, at_slots + 8 * rows


@dataclass
class _Staging:
    """A pinned host buffer a step's input bytes cross to the device from."""

    inputs: Tensor  # uint8, laid out as the graph's input bytes
    used: torch.cuda.Event  # recorded after the last step that copied out of it

    def __post_init__(self) -> None:
        self.inputs_np = self.inputs.numpy()


@dataclass
class RowStep:
    """A decode step fed from host rows, prepared (``GraphedDecoder.prepare``), not yet launched."""

    graph: _Graph
    padded: bool
    n: int  # sessions
    size: int  # the graph's rows
    row: int  # bytes per row
    staged: _Staging
    copied: int  # how many of the graph's input bytes the step feeds


def width_bucket(n_new: int) -> int:
    """The graph width of a step of ``n_new`` positions per session: 1, or a power of two."""
    width = 1
    while width < n_new:
        width *= 2
    return width


class GraphedDecoder:
    """Runs ``stage`` for a few new tokens per session, through a graph per (slots, bucket, width)."""

    def __init__(
        self, stage: Stage, cache: KVCache, *, compile_layers: bool = False, pad_batches: bool = False
    ) -> None:
        if cache.device.type != "cuda":
            raise ValueError("CUDA graphs need a stage and cache on a CUDA device")
        self.stage, self.cache = stage, cache
        # Decode products of one row, and decode attention, in our kernels where cuBLAS and SDPA are slower.
        bf16_gluon.prepare(cache.device)
        attention_cuda.prepare(cache.device)
        # torch.compile fuses a layer's small kernels; the graph then replays the fused ones.
        self._layer_fn = torch.compile(layer_forward, dynamic=False) if compile_layers else None
        if compile_layers:
            # One compilation per graph shape (KV bucket, width, batch size; the first layer
            # apart, it has no residual to add): past dynamo's default 8 it would run the layer
            # eagerly, silently slower, inside the graphs captured later.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 2 * MAX_GRAPHS)
        # With pad_batches a batch of several sessions replays the graph of its size bucket (1, 2,
        # 4, ...) with the sessions' slots fed in, so batches whose members change (a stage's
        # continuous batching) capture a few graphs, not one per set of slots.
        self.pad_batches = pad_batches
        self._graphs: dict[tuple[object, int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        # Two staging buffers in turn: a step fills one while the GPU may still copy out of the
        # other, so preparing it never waits for the GPU (``launch`` does, after its replay).
        self._staged: list[_Staging | None] = [None, None]
        self._turn = 0

    def __call__(self, x: Tensor, batch: Batch) -> Tensor:
        """Same contract as ``stage(x, cache, batch)`` for a batch of a few new positions each."""
        slots = batch.slot_ids or tuple(batch.slots.tolist())
        n_new = x.shape[1]
        width = width_bucket(n_new)
        g, padded = self._pick(slots, bucket_for(batch.kv_len, self.cache.max_seq), width, x)
        n = len(slots)
        scratch = self.cache.scratch_position
        if padded:
            # Rows past the batch stay aimed at the scratch position of a slot in it: they compute
            # nothing anyone reads.
            g.batch.slots[:n].copy_(batch.slots)
            g.batch.slots[n:].fill_(slots[0])
            g.batch.positions[n:].fill_(scratch)
            g.x[n:].zero_()
        if width > n_new:
            g.x[:n, n_new:].zero_()
            g.batch.positions[:n, n_new:].fill_(scratch)
        g.x[:n, :n_new].copy_(x)
        g.batch.positions[:n, :n_new].copy_(batch.positions)
        g.graph.replay()
        out = g.out[:n] if padded else g.out
        return out[:, :n_new] if width > n_new else out

    def prepare(self, like: Tensor, slots: Sequence[int], starts: Sequence[int], kv_len: int) -> RowStep:
        """A decode step (one new position per session) fed from the host, before its rows are
        known (a stage prepares while the previous stage's GPU still runs): the graph picked for
        ``like`` (one row of the step's input, ``[1, 1, ...]``), and ``starts`` (where each new
        position goes, ``KVCache.advance``) and the slots written into a pinned buffer laid out
        as the graph's input bytes, which ``launch`` copies with the rows in one copy. Only the
        CPU works here."""
        slots = tuple(slots)
        g, padded = self._pick(slots, bucket_for(kv_len, self.cache.max_seq), 1, like)
        n, size = len(slots), g.x.shape[0]
        row = g.x[0].numel() * g.x.element_size()
        staged = self._staging(g.inputs.numel())
        index = staged.inputs_np[g.at_positions : g.at_slots].view(np.int64)
        index[:n] = starts
        index[n:] = self.cache.scratch_position
        copied = g.at_slots  # a slot's own graph reads its slots from where they were captured
        if padded:
            copied = g.inputs.numel()
            fed = staged.inputs_np[g.at_slots : copied].view(np.int64)
            fed[:n] = slots
            fed[n:] = slots[0]
        return RowStep(g, padded, n, size, row, staged, copied)

    def launch(self, step: RowStep, rows: Sequence[memoryview | bytes]) -> Tensor:
        """The prepared step's ``rows`` (each session's input as the bytes of one row), its
        positions and slots to the device in one copy, and its graph launched; its output.
        Then the other staging buffer is waited for (its step's graph has long run, as a rule)."""
        g, n, size, row, staged = step.graph, step.n, step.size, step.row, step.staged
        inputs = staged.inputs_np
        for i, data in enumerate(rows):
            inputs[i * row : (i + 1) * row] = np.frombuffer(data, dtype=np.uint8, count=row)
        inputs[n * row : size * row] = 0
        g.inputs[: step.copied].copy_(staged.inputs[: step.copied], non_blocking=True)
        g.graph.replay()
        staged.used.record()  # after the replay: off the path from the input to the launch
        self._turn ^= 1
        other = self._staged[self._turn]
        if other is not None:
            other.used.synchronize()
        return g.out[:n] if step.padded else g.out

    def _pick(self, slots: tuple[int, ...], bucket: int, width: int, x: Tensor) -> tuple[_Graph, bool]:
        """The graph a step of ``slots`` replays (captured now if it is not yet), and whether it
        is a padded one that any slots can feed."""
        # One session replays its slot's own graph (a view of the cache, no gather) when there is
        # one; with pad_batches a session in another slot takes the size-1 graph any slot can.
        padded = self.pad_batches and (len(slots) > 1 or (slots, bucket, width) not in self._graphs)
        size = batch_bucket(len(slots), self.cache.max_slots) if padded else 0
        key: tuple[object, int, int] = (size if padded else slots, bucket, width)
        g = self._graphs.pop(key, None)
        if g is None:
            if len(self._graphs) >= MAX_GRAPHS:
                del self._graphs[next(iter(self._graphs))]  # the least recently used one
            g = self._capture((slots[0],) * size if padded else slots, bucket, x, gathered=padded, width=width)
        self._graphs[key] = g  # (re)inserted last: the dict keeps recency order
        return g, padded

    def _staging(self, nbytes: int) -> _Staging:
        staged = self._staged[self._turn]
        if staged is None or staged.inputs.numel() < nbytes:
            # (An older buffer is freed safely: torch's pinned allocator holds it until the
            # copies out of it have run.)
            size = max(nbytes, 0 if staged is None else staged.inputs.numel())
            staged = _Staging(torch.empty(size, dtype=torch.uint8, pin_memory=True), torch.cuda.Event())
            self._staged[self._turn] = staged
        return staged

    def warm(self, slots: tuple[int, ...], kv_lens: range, x: Tensor) -> None:
        """Capture now, before decoding, the graphs a session in ``slots`` will replay while its
        attention spans ``kv_lens`` (``x``: an input of the decode step's shape), so no capture
        happens inside the timed decode."""
        for bucket in sorted({bucket_for(n, self.cache.max_seq) for n in kv_lens}):
            key = (slots, bucket, 1)
            if key not in self._graphs and len(self._graphs) < MAX_GRAPHS:
                self._graphs[key] = self._capture(slots, bucket, x)

    def warm_batches(self, max_batch: int, x: Tensor, *, limit: int = WARM_GRAPHS) -> int:
        """Capture, before a stage serves, the graphs its decode steps replay: for every KV
        bucket (shortest first), slot 0's own (where a lone answer runs) and each batch-size
        bucket up to ``max_batch``, at most ``limit`` in all (the rest are captured when first
        met). ``x``: one row of the step's input. Returns how many were captured."""
        if not self.pad_batches:
            raise ValueError("warm_batches is for a stage's padded batches")
        sizes = sorted({batch_bucket(n, self.cache.max_slots) for n in range(1, max(1, max_batch) + 1)})
        buckets, kv = [], MIN_BUCKET
        while not buckets or buckets[-1] < self.cache.max_seq:
            buckets.append(bucket_for(kv, self.cache.max_seq))
            kv = buckets[-1] * 2
        captured = 0
        for bucket in buckets:
            for size in [0, *sizes]:
                key: tuple[object, int, int] = ((0,), bucket, 1) if size == 0 else (size, bucket, 1)
                if key in self._graphs:
                    continue
                if captured >= limit or len(self._graphs) >= MAX_GRAPHS:
                    return captured
                slots = (0,) if size == 0 else (0,) * size
                self._graphs[key] = self._capture(slots, bucket, x, gathered=size != 0)
                captured += 1
        return captured

    def _capture(
        self, slots: tuple[int, ...], bucket: int, x: Tensor, *, gathered: bool = False, width: int = 1
    ) -> _Graph:
        cache = self.cache
        device = cache.device
        rows, row_bytes = len(slots), math.prod(x.shape[2:]) * x.element_size()
        at_positions, at_slots, total = _layout(rows, width, row_bytes)
        inputs = torch.zeros(total, dtype=torch.uint8, device=device)
        static_x = inputs[: rows * width * row_bytes].view(x.dtype).view(rows, width, *x.shape[2:])
        # Warm-up runs execute for real: aim them at the scratch position so no session is touched.
        positions = inputs[at_positions:at_slots].view(torch.long).view(rows, width)
        positions.fill_(cache.scratch_position)
        slot_ids = inputs[at_slots:total].view(torch.long)
        slot_ids.copy_(torch.tensor(slots, dtype=torch.long))
        first = slots[0]
        contiguous = not gathered and list(slots) == list(range(first, first + len(slots)))
        batch = Batch(slots=slot_ids, positions=positions, kv_len=bucket, slot_start=first if contiguous else None)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self.stage(static_x, cache, batch, layer_fn=self._layer_fn, graphed=True)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a stage captures on its event loop while another thread may load layers.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"), torch.inference_mode():
            out = self.stage(static_x, cache, batch, layer_fn=self._layer_fn, graphed=True)
        return _Graph(graph, static_x, batch, out, inputs, at_positions, at_slots)
