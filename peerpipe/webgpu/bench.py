"""Benchmarks of a WebGPU adapter, so the planner treats it like any other device: the seed's
1024 x 1024 WGSL matmul, a weight-streaming bandwidth, a dispatch round trip, and one decoder
layer of the room's model (random weights) for decode and prefill."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from peerpipe.engine.config import ModelConfig
from peerpipe.engine.model import Block, Stage
from peerpipe.protocol import LayerTiming
from peerpipe.webgpu.executor import Dispatch, Executor
from peerpipe.webgpu.load import local_executor, weight_type
from peerpipe.webgpu.stage import WebGPUStage

STREAM_BYTES = 128 << 20  # layers timed in a stack of at least this many weight bytes


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
    """The seed's benchmark: an n x n f32 matmul in WGSL (16 x 16 tiles), TFLOPS. Several
    dispatches share one submit so the figure is the GPU's, not the round trip's."""
    gpu = gpu or local_executor()
    p = gpu.buffer(4)
    gpu.write(p, n.to_bytes(4, "little"))
    a, b, c = (gpu.buffer(n * n * 4) for _ in range(3))
    data = torch.randn(n, n).numpy().tobytes()
    gpu.write(a, data)
    gpu.write(b, data)
    if n % 32:
        raise ValueError(f"the WGSL matmul takes sizes that are multiples of 32, not {n}")
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
    seconds = _median_s(lambda: gpu.run(mv, [(y, 4)]), rounds, 1) / 4
    empty = _median_s(lambda: gpu.run([], [(y, 4)]), rounds, 5)
    return n * k * 4 / seconds / 1e9, empty * 1e3


def bench_layer(cfg: ModelConfig, dtype: str, *, prefill_tokens: int = 0, quick: bool = False,
                gpu: Executor | None = None) -> LayerTiming:
    """Decode and prefill time of one layer: ``k`` random layers (enough bytes to stream from
    memory) timed as a stage of ``k`` and of ``2k``; the difference is ``k`` layers' worth."""
    gpu = gpu or local_executor()
    prefill_tokens = prefill_tokens or (32 if quick else 128)
    wt = weight_type(dtype, gpu)
    item = 2 if wt == "f16" else 4
    layer_bytes = cfg.layer_param_count() * item
    # Quick (a joining node, a software adapter): the least that still splits a layer from the
    # stage's own cost, one layer against two.
    k = 1 if quick else max(1, min(16, -(-STREAM_BYTES // max(1, layer_bytes))))
    tall = dataclasses.replace(cfg, n_layers=2 * k + 2, windows=())
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        short, double = Stage(tall, 1, 1 + k), Stage(tall, 1, 1 + 2 * k)
    for i in range(k):
        with torch.device("meta"):
            block = Block(tall)
        block = block.to_empty(device="cpu")
        with torch.no_grad():
            for name, param in block.named_parameters():
                param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02, generator=generator)
        short.layers[i] = block
    for i in range(2 * k):
        double.layers[i] = short.layers[i % k]
    rounds = 2 if quick else 5

    def timings(stage: Stage) -> tuple[float, float]:
        ws = WebGPUStage.from_torch(gpu, stage, wt)
        cache = ws.new_cache(1, prefill_tokens + 8)
        slot = cache.alloc()
        prompt = torch.randn(1, prefill_tokens, cfg.hidden_size)
        token = torch.randn(1, 1, cfg.hidden_size)

        def prefill() -> None:
            cache.rollback(slot, 0)
            ws(prompt, cache, cache.batch([slot], prefill_tokens))

        def decode() -> None:
            cache.rollback(slot, prefill_tokens)
            ws(token, cache, cache.batch([slot], 1))

        prefill()
        return _median_s(prefill, rounds, 1), _median_s(decode, rounds, 1 if quick else 3)

    prefill_k, decode_k = timings(short)
    prefill_2k, decode_2k = timings(double)
    decode = (decode_2k - decode_k) / k
    if decode <= 0:
        decode, overhead = decode_2k / (2 * k), 0.0
    else:
        overhead = max(0.0, decode_k - k * decode)
    prefill = max((prefill_2k - prefill_k) / k, prefill_2k / (4 * k))
    return LayerTiming(cfg.shape_key, dtype, decode * 1e3, prefill * 1e3, prefill_tokens, layer_bytes, overhead * 1e3)
