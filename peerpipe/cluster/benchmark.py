"""Measure the local device: matmul TFLOPS, memory bandwidth, launch latency, and one layer of
a model for decode and prefill. Results are cached per device and model shape.

Every figure is the median of several timed rounds after a warm-up, with the device synchronised
around each round, so a GPU's asynchronous launches are not mistaken for speed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerpipe.cluster.capabilities import DeviceCaps
from peerpipe.compute import step_aside
from peerpipe.paths import cache_dir
from peerpipe.protocol import LayerTiming

if TYPE_CHECKING:
    import torch

    from peerpipe.engine.config import ModelConfig

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 2: layers timed in cache-overflowing stacks, with the stage overhead; 3: fp32 CPU matrices by columns
Progress = Callable[[str], None]


@dataclass(frozen=True)
class DeviceBench:
    tflops_1024: float  # fp32, the seed's 1024 x 1024 matmul
    tflops: float  # fp32 at ``big_size``, a size that fills the device
    big_size: int
    tflops_half: float  # bf16 or fp16 at ``big_size``; 0 where half precision is not fast
    half_dtype: str
    memory_gbps: float  # copy bandwidth, bytes read + written per second
    launch_ms: float  # one tiny kernel, launch to done

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize()


def _nothing() -> None:
    pass


def time_it(
    fn: Callable[[], object], device: torch.device, *, rounds: int = 5, min_round_s: float = 0.02,
    between: Callable[[], None] = _nothing,
) -> float:
    """Median seconds per call of ``fn``; each round repeats it until ``min_round_s`` has passed.
    ``between`` runs before each round (compute.step_aside, say)."""
    between()
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    reps = max(1, min(10_000, int(min_round_s / once)))
    samples = []
    for _ in range(rounds):
        between()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def bench_device(caps: DeviceCaps, *, quick: bool = False, progress: Progress | None = None) -> DeviceBench:
    import torch

    say = progress or (lambda _: None)
    if caps.kind == "webgpu":
        return _bench_webgpu(caps.torch_device, quick, say)
    device = torch.device(caps.torch_device)
    accel = caps.kind != "cpu"
    rounds = 3 if quick else 5

    def matmul_tflops(n: int, dtype: torch.dtype) -> float:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        seconds = time_it(lambda: torch.mm(a, b, out=out), device, rounds=rounds)
        return 2 * n**3 / seconds / 1e12

    say("matmul 1024 fp32")
    t1024 = matmul_tflops(1024, torch.float32)
    big = (8192 if accel else 2048) if not quick else (4096 if accel else 1024)
    if big != 1024:
        say(f"matmul {big} fp32")
    tbig = matmul_tflops(big, torch.float32) if big != 1024 else t1024
    half_dtype = torch.bfloat16 if caps.supports_bf16 else torch.float16
    thalf = 0.0
    if accel:
        say(f"matmul {big} {half_dtype}".replace("torch.", ""))
        thalf = matmul_tflops(big, half_dtype)
    say("memory bandwidth")
    nbytes = (256 << 20) if accel else (64 << 20)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    gbps = 2 * nbytes / time_it(lambda: dst.copy_(src), device, rounds=rounds) / 1e9
    say("launch latency")
    tiny = torch.zeros(1, device=device)

    def one_kernel() -> None:
        tiny.add_(1)
        _sync(device)

    launch = time_it(one_kernel, device, rounds=rounds) * 1e3
    return DeviceBench(
        t1024, tbig, big, thalf, str(half_dtype).removeprefix("torch.") if accel else "", gbps, launch
    )


SHM_PROBE_BYTES = 4 << 20


def bench_shared_memory(torch_device: str, rounds: int = 3) -> float:
    """GB/s of hidden states from this device through shared memory back to the device, as a
    stage sends them to a node of the same machine (transport/shared_memory.py); 0 where there
    is no shared memory."""
    import torch

    from peerpipe.transport.shared_memory import Ring, Segments, SharedMemoryError, machine_id

    if not machine_id():
        return 0.0
    device = torch.device(torch_device)
    try:
        ring = Ring(4 * SHM_PROBE_BYTES)
    except OSError:
        return 0.0
    segments = Segments()
    src = torch.ones(SHM_PROBE_BYTES, dtype=torch.uint8, device=device)

    def hop() -> None:
        got = ring.alloc(SHM_PROBE_BYTES)
        assert got is not None  # one allocation at a time in a ring of four
        ref, view = got
        torch.frombuffer(view, dtype=torch.uint8).copy_(src)
        segments.read(ref, SHM_PROBE_BYTES, lambda v: torch.frombuffer(v, dtype=torch.uint8).to(device, copy=True))

    try:
        seconds = time_it(hop, device, rounds=rounds, min_round_s=0.002)
    except SharedMemoryError:
        return 0.0
    finally:
        segments.close()
        ring.close()
    return SHM_PROBE_BYTES / seconds / 1e9


def _bench_webgpu(device: str, quick: bool, say: Progress) -> DeviceBench:
    from peerpipe.webgpu.bench import bandwidth_gbps, matmul_tflops
    from peerpipe.webgpu.load import executor_for

    gpu = executor_for(device)
    rounds = 3 if quick else 5
    say("WGSL matmul 1024 fp32 (the seed's benchmark)")
    t1024 = matmul_tflops(1024, gpu=gpu, rounds=rounds)
    big, tbig = 1024, t1024
    if not quick:
        big = 2048
        say(f"WGSL matmul {big} fp32")
        tbig = matmul_tflops(big, gpu=gpu, rounds=rounds)
    say("weight streaming and submit latency")
    gbps, latency_ms = bandwidth_gbps(gpu=gpu, rounds=rounds)
    return DeviceBench(t1024, tbig, big, 0.0, "", gbps, latency_ms)


# Layers are timed in a stack at least this large, so weights stream from memory as in a real
# model rather than sitting in a cache (a lone small layer would look several times faster).
STREAM_BYTES = 256 << 20
MAX_STACK = 32


def bench_layer(
    cfg: ModelConfig, device: str, dtype: str, *, prefill_tokens: int = 128, quick: bool = False, quantize: str = "none",
    between: Callable[[], None] = _nothing,
) -> LayerTiming:
    """Time decoder layers of ``cfg`` with random weights: one token after a ``prefill_tokens``
    prompt (decode), and the prompt itself (prefill).

    ``k`` distinct layers (enough bytes to overflow the caches) are timed as a stage of ``k`` and
    as a stage of ``2k`` (the same layers twice, in turn); the difference is ``k`` layers' worth,
    and what remains is the stage's own cost per step (masks, positions), which a pipeline pays
    once per stage, not per layer. A WebGPU device (``webgpu``, ``webgpu:NAME``) times the same
    stacks through its WGSL stage. ``between`` runs between its steps (layers drawn, rounds
    timed): compute.step_aside makes a re-measure give way to answers.
    """
    import torch

    from peerpipe.engine.cuda_graphs import GraphedDecoder
    from peerpipe.engine.model import Stage

    if device.startswith("webgpu"):
        return _bench_webgpu_layer(cfg, device, dtype, quick, between)
    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    item = torch.tensor([], dtype=torch_dtype).element_size()
    layer_bytes = cfg.layer_param_count() * item
    k = max(1, min(MAX_STACK, -(-(STREAM_BYTES // (2 if quick else 1)) // max(1, layer_bytes))))
    short, double = _random_stacks(cfg, k, dev, torch_dtype, between)
    if quantize != "none":  # the layers as this node will hold them (their matrices freed here)
        short.quantize(quantize)
        double._quant = [short._quant[i % k] for i in range(2 * k)]
        double.quant_mode = quantize
        layer_bytes = sum(q.nbytes for q in short._quant[0].values()) + sum(
            p.numel() * p.element_size() for p in short.layers[0].parameters()
        )
    short.lay_out_for_cpu()  # as a loaded stage holds them (engine/cpu_layout.py); double shares the layers
    prompt = torch.randn(1, prefill_tokens, cfg.hidden_size, device=dev, dtype=torch_dtype)
    token = torch.randn(1, 1, cfg.hidden_size, device=dev, dtype=torch_dtype)
    rounds = 3 if quick else 5

    def timings(stage: Stage) -> tuple[float, float]:
        cache = stage.new_cache(1, prefill_tokens + 8)
        slot = cache.alloc()

        def prefill() -> None:
            cache.rollback(slot, 0)
            stage(prompt, cache, cache.batch([slot], prefill_tokens))

        # On CUDA a stage replays its decode steps from captured graphs: time what it runs, not
        # the launches of an eager step (three times as long for a 1B shape on an H200).
        step = GraphedDecoder(stage, cache, pad_batches=True) if dev.type == "cuda" else None

        def decode() -> None:
            cache.rollback(slot, prefill_tokens)
            if step is not None:
                step(token, cache.batch([slot], 1))
            else:
                stage(token, cache, cache.batch([slot], 1))

        with torch.inference_mode():
            return (time_it(prefill, dev, rounds=rounds, between=between),
                    time_it(decode, dev, rounds=rounds, between=between))

    return _layer_timing(cfg, dtype, k, layer_bytes, prefill_tokens, timings(short), timings(double))


def _random_stacks(
    cfg: ModelConfig, k: int, dev: torch.device, torch_dtype: torch.dtype, between: Callable[[], None]
) -> tuple[Any, Any]:
    """Middle stages (no embedding, no head) of ``k`` random layers, and of the same ``k`` twice."""
    import torch

    from peerpipe.engine.model import Block, Stage

    tall = dataclasses.replace(cfg, n_layers=2 * k + 2, windows=())
    with torch.device("meta"):
        short = Stage(tall, 1, 1 + k)
        double = Stage(tall, 1, 1 + 2 * k)
    generator = torch.Generator(device=dev).manual_seed(0)
    for i in range(k):
        between()
        with torch.device("meta"):
            block = Block(tall)
        block = block.to_empty(device=dev).to(torch_dtype)
        with torch.no_grad():
            for name, param in block.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
        short.layers[i] = block
    for i in range(2 * k):
        double.layers[i] = short.layers[i % k]
    return short, double


def _layer_timing(
    cfg: ModelConfig, dtype: str, k: int, layer_bytes: int, prefill_tokens: int,
    short: tuple[float, float], double: tuple[float, float],
) -> LayerTiming:
    """One layer's figures from the (prefill, decode) seconds of stacks of ``k`` and ``2k``."""
    (prefill_k, decode_k), (prefill_2k, decode_2k) = short, double
    decode = (decode_2k - decode_k) / k
    if decode <= 0:  # noise larger than k layers: no split is credible
        decode, overhead = decode_2k / (2 * k), 0.0
    else:
        overhead = max(0.0, decode_k - k * decode)
    prefill = max((prefill_2k - prefill_k) / k, prefill_2k / (4 * k))
    return LayerTiming(
        cfg.shape_key, dtype, decode * 1e3, prefill * 1e3, prefill_tokens, layer_bytes, overhead * 1e3
    )


# WebGPU stacks stream at least this many weight bytes; quick (a joining node, a software
# adapter) takes the least that still splits a layer from the stage's own cost: 1 against 2.
WEBGPU_STREAM_BYTES = 128 << 20
WEBGPU_MAX_STACK = 16


def _bench_webgpu_layer(cfg: ModelConfig, device: str, dtype: str, quick: bool, between: Callable[[], None]) -> LayerTiming:
    import torch

    from peerpipe.webgpu.bench import time_stage
    from peerpipe.webgpu.load import executor_for, weight_type

    gpu = executor_for(device)
    wt = weight_type(dtype, gpu)
    prefill_tokens = 32 if quick else 128
    layer_bytes = cfg.layer_param_count() * (2 if wt == "f16" else 4)
    k = 1 if quick else max(1, min(WEBGPU_MAX_STACK, -(-WEBGPU_STREAM_BYTES // max(1, layer_bytes))))
    stacks = _random_stacks(cfg, k, torch.device("cpu"), torch.float32, between)
    short, double = (
        time_stage(gpu, s, wt, prefill_tokens, rounds=2 if quick else 5, decode_reps=1 if quick else 3) for s in stacks
    )
    return _layer_timing(cfg, dtype, k, layer_bytes, prefill_tokens, short, double)


# -- the cache ------------------------------------------------------------------------------


def _cache_file(caps: DeviceCaps) -> Path:
    import torch

    ident = f"{caps.kind}-{caps.name}-{caps.cpu_cores}c-torch{torch.__version__}"
    return cache_dir() / "bench" / (re.sub(r"[^A-Za-z0-9_.+-]+", "_", ident) + ".json")


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # nodes on one machine write the same cache
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic, so a concurrent reader never sees half a file


MAX_CACHE_AGE_S = 30 * 86400.0


class BenchCache:
    """Benchmarks of this device, measured once and then read from ``~/.cache/peerpipe/bench``."""

    def __init__(self, caps: DeviceCaps, *, use_cache: bool = True, quick: bool = False) -> None:
        self.caps = caps
        self.path = _cache_file(caps)
        self.use_cache = use_cache
        self.quick = quick
        self.hits: list[str] = []

    def device(self, progress: Progress | None = None) -> DeviceBench:
        data = _read_cache(self.path) if self.use_cache else {}
        measured_at = data.get("device_measured_at")
        # A figure is kept for a while, not for ever: drivers, clocks and the machine's load change.
        fresh = isinstance(measured_at, int | float) and time.time() - measured_at < MAX_CACHE_AGE_S
        if (raw := data.get("device")) and fresh:
            with_fields = {f.name for f in dataclasses.fields(DeviceBench)}
            if isinstance(raw, dict) and raw.keys() == with_fields:
                self.hits.append("device")
                return DeviceBench(**raw)
        result = bench_device(self.caps, quick=self.quick, progress=progress)
        self._store("device", result.to_json())
        self._store("device_measured_at", time.time())
        return result

    def shared_memory(self) -> float:
        """``bench_shared_memory`` for this device, cached like the device's figures (nodes of one
        machine start at once: one measures, the rest read it)."""
        data = _read_cache(self.path) if self.use_cache else {}
        measured_at = data.get("shm_measured_at")
        fresh = isinstance(measured_at, int | float) and time.time() - measured_at < MAX_CACHE_AGE_S
        if isinstance(cached := data.get("shm_gbps"), int | float) and fresh:
            self.hits.append("shm")
            return float(cached)
        gbps = bench_shared_memory(self.caps.torch_device) if self.caps.kind != "webgpu" else 0.0
        self._store("shm_gbps", gbps)
        self._store("shm_measured_at", time.time())
        return gbps

    def layer(
        self, cfg: ModelConfig, dtype: str, progress: Progress | None = None, *, fresh: bool = False,
        quantize: str = "none",
    ) -> LayerTiming:
        """One layer's timing, from the cache unless ``fresh`` (which measures and caches anew,
        and raises compute.SteppedAside if other work arrives for the compute thread meanwhile)."""
        key = f"{cfg.shape_key}/{dtype}" + (f"/{quantize}" if quantize != "none" else "")
        data = _read_cache(self.path) if self.use_cache and not fresh else {}
        raw = data.get("layers", {}).get(key)
        if isinstance(raw, dict):
            try:
                timing = LayerTiming(**raw)
            except (TypeError, ValueError):
                timing = None
            if timing is not None:
                self.hits.append(key)
                return timing
        if progress:
            progress(f"one layer of {cfg.shape_key} in {dtype}" + (f", {quantize} weights" if quantize != "none" else ""))
        # A fresh timing is a re-measure while the room may be serving: it gives way to answers.
        between = step_aside if fresh else _nothing
        timing = bench_layer(cfg, self.caps.torch_device, dtype, quick=self.quick, quantize=quantize, between=between)
        self._store_layer(key, timing)
        return timing

    def _store(self, field: str, value: Any) -> None:
        """Write ``field`` into the cache file; a dict value is merged into what is there."""
        data = _read_cache(self.path) or {"version": CACHE_VERSION}
        old = data.get(field)
        data[field] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
        try:
            _write_cache(self.path, data)
        except OSError as exc:
            log.warning("cannot cache benchmarks in %s: %s", self.path, exc)

    def _store_layer(self, key: str, timing: LayerTiming) -> None:
        self._store("layers", {key: {f.name: getattr(timing, f.name) for f in dataclasses.fields(LayerTiming)}})
