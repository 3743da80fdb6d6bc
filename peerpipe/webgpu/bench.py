"""Benchmarks of a WebGPU adapter, so the planner treats it like any other device: the seed's
1024 x 1024 WGSL matmul, a weight-streaming bandwidth, a dispatch round trip, and the timing of
a stage that ``cluster/benchmark.bench_layer`` splits into one layer's figures."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from peerpipe.engine.model import Stage
from peerpipe.webgpu.executor import Dispatch, Executor
from peerpipe.webgpu.load import local_executor
from peerpipe.webgpu.stage import WebGPUStage


def _median_s(fn: Callable[[], object], rounds: int, reps: int) -> float:
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def matmul_tflops(n: int = 1024, *, gpu: Executor | None = None, rounds: int = 5) -> float:
    """The seed's benchmark: an n x n f32 matmul in WGSL (4 x 4 blocks a thread), TFLOPS. On a
    fast GPU several dispatches share one submit, so the figure is the GPU's, not the round trip's."""
    if n % 32:
        raise ValueError(f"the WGSL matmul takes sizes that are multiples of 32, not {n}")
    gpu = gpu or local_executor()
    p = gpu.buffer(4)
    gpu.write(p, n.to_bytes(4, "little"))
    a, b, c = (gpu.buffer(n * n * 4) for _ in range(3))
    try:
        data = torch.randn(n, n).numpy().tobytes()
        gpu.write(a, data)
        gpu.write(b, data)
        one = [Dispatch("bench_matmul", (p, a, b, c), (n // 32, n // 32, 1))]
        gpu.run(one, [(c, 4)])  # compiles the kernel
        began = time.perf_counter()
        gpu.run(one, [(c, 4)])
        once = time.perf_counter() - began
        # A fast GPU needs several dispatches per submit to hide the round trip; a software one
        # (SwiftShader, lavapipe) takes seconds per dispatch and is measured once.
        reps = max(1, min(8, int(0.05 / max(once, 1e-6))))
        work = one * reps
        seconds = _median_s(lambda: gpu.run(work, [(c, 4)]), rounds if once < 0.5 else 1, 1) / reps
    finally:
        gpu.free([p, a, b, c])
    return 2 * n**3 / seconds / 1e12


def bandwidth_gbps(*, gpu: Executor | None = None, rounds: int = 5) -> tuple[float, float]:
    """Weight-streaming GB/s (a 2048-wide matrix-vector product over 64 MB of f32 weights) and
    the milliseconds of one empty submit and read back (the latency a step pays at least)."""
    gpu = gpu or local_executor()
    k, n = 2048, (64 << 20) // (2048 * 4)
    step = gpu.buffer(16 + 64)
    gpu.write(step, (1).to_bytes(4, "little"))
    p = gpu.buffer(20)
    gpu.write(p, b"".join(v.to_bytes(4, "little") for v in (n, k, 0, 0, 0)))
    x, w, bias, y = gpu.buffer(k * 4), gpu.buffer(n * k * 4), gpu.buffer(16), gpu.buffer(n * 4)
    mv = [Dispatch("matmul", (p, step, x, w, bias, y), (min(n, 32768), -(-n // 32768), 1))] * 4
    try:
        seconds = _median_s(lambda: gpu.run(mv, [(y, 4)]), rounds, 1) / 4
        empty = _median_s(lambda: gpu.run([], [(y, 4)]), rounds, 5)
    finally:
        gpu.free([step, p, x, w, bias, y])
    return n * k * 4 / seconds / 1e9, empty * 1e3


def time_stage(
    gpu: Executor, stage: Stage, weight_type: str, prefill_tokens: int, *, rounds: int, decode_reps: int
) -> tuple[float, float]:
    """Seconds of a ``prefill_tokens`` prompt and of one token after it, through ``stage`` (a torch
    stage of middle layers, copied into GPU buffers in ``weight_type``)."""
    ws = WebGPUStage.from_torch(gpu, stage, weight_type)
    cache = ws.new_cache(1, prefill_tokens + 8)
    slot = cache.alloc()
    prompt = torch.randn(1, prefill_tokens, stage.cfg.hidden_size)
    token = torch.randn(1, 1, stage.cfg.hidden_size)

    def prefill() -> None:
        cache.rollback(slot, 0)
        ws(prompt, cache, cache.batch([slot], prefill_tokens))

    def decode() -> None:
        cache.rollback(slot, prefill_tokens)
        ws(token, cache, cache.batch([slot], 1))

    prefill()
    return _median_s(prefill, rounds, 1), _median_s(decode, rounds, decode_reps)
