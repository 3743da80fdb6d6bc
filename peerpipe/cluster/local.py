"""This node's device as the cluster sees it: capabilities and benchmarks, measured off the
event loop so heartbeats keep flowing, and the answer to a benchmark request."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from peerpipe.cluster.benchmark import BenchCache, DeviceBench, Progress
from peerpipe.cluster.capabilities import DeviceCaps, cpu_mask, default_dtype, detect
from peerpipe.cluster.links import measure_links
from peerpipe.compute import SteppedAside, run_compute
from peerpipe.errors import PeerpipeError
from peerpipe.protocol import BenchmarkRequest, BenchmarkResult, LayerTiming, NodeInfo
from peerpipe.room import RoomNode
from peerpipe.transport.shared_memory import machine_id


@dataclass
class LoadMeter:
    """Fraction of recent wall time spent working, for heartbeats."""

    window_s: float = 5.0
    _spans: list[tuple[float, float]] = field(default_factory=list)
    _since: float | None = None

    def start(self) -> None:
        self._since = time.monotonic()

    def stop(self) -> None:
        if self._since is not None:
            self._spans.append((self._since, time.monotonic()))
            self._since = None

    @property
    def busy(self) -> bool:
        return self._since is not None

    def load(self) -> float:
        now = time.monotonic()
        cutoff = now - self.window_s
        self._spans = [(a, b) for a, b in self._spans if b > cutoff]
        spans = [*self._spans, *([(self._since, now)] if self._since is not None else [])]
        busy = sum(b - max(a, cutoff) for a, b in spans)
        return min(1.0, max(0.0, busy / self.window_s))


@dataclass
class LocalDevice:
    caps: DeviceCaps
    bench: DeviceBench
    cache: BenchCache
    memory_limit_bytes: int | None = None  # what the user lets peerpipe use, if less than free
    quantize: str = "none"  # how this node holds its layers' matrices (engine/quant.py)
    shm_gbps: float = 0.0  # hidden states through shared memory to a node of this machine
    meter: LoadMeter = field(default_factory=LoadMeter)

    @classmethod
    async def measure(
        cls,
        device: str | None = None,
        *,
        quick: bool = False,
        use_cache: bool = True,
        memory_limit_bytes: int | None = None,
        progress: Progress | None = None,
    ) -> LocalDevice:
        def work() -> LocalDevice:
            caps = detect(device)
            cache = BenchCache(caps, use_cache=use_cache, quick=quick)
            return cls(caps, cache.device(progress), cache, memory_limit_bytes, shm_gbps=cache.shared_memory())

        return await run_compute(work)

    @property
    def default_dtype(self) -> str:
        if self.caps.kind == "webgpu":  # f16 storage where the adapter has shader-f16
            return "float16" if self.caps.supports_f16 else "float32"
        return default_dtype(self.caps.kind, self.caps.supports_bf16)

    @property
    def offered_bytes(self) -> int:
        free = self.caps.memory_free_bytes
        return min(free, self.memory_limit_bytes) if self.memory_limit_bytes is not None else free

    def node_info(self, node_id: str, name: str, address: str = "") -> NodeInfo:
        caps, bench = self.caps, self.bench
        return NodeInfo(
            node_id=node_id,
            name=name,
            device=caps.kind,
            memory_bytes=self.offered_bytes,
            tflops=bench.tflops,
            supports_f16=caps.supports_f16,
            memory_bandwidth_gbps=bench.memory_gbps,
            address=address,
            device_name=caps.name,
            memory_total_bytes=caps.memory_total_bytes,
            tflops_half=bench.tflops_half,
            latency_ms=bench.launch_ms,
            supports_bf16=caps.supports_bf16,
            cpu_cores=caps.cpu_cores,
            ram_bytes=caps.ram_total_bytes,
            quantize=self.quantize,
            machine=machine_id() if self.shm_gbps > 0 else "",
            shm_gbps=self.shm_gbps,
            gpu=caps.gpu,
            cpus=cpu_mask(),
        )

    async def layer_timing(self, model_shape: str, dtype: str, *, fresh: bool = False) -> LayerTiming:
        from peerpipe.engine.config import ModelConfig

        try:
            raw = json.loads(model_shape)
        except ValueError as exc:
            raise PeerpipeError(f"the model shape is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise PeerpipeError("the model shape must be a config.json object")
        cfg = ModelConfig.from_hf(raw)
        self.meter.start()
        try:
            return await run_compute(
                self.cache.layer, cfg, dtype or self.default_dtype, fresh=fresh,
                quantize="none" if self.quantize == "auto" else self.quantize,  # auto: timed as it is held at first
            )
        finally:
            self.meter.stop()

    async def answer(self, node: RoomNode, request: BenchmarkRequest) -> BenchmarkResult:
        """Run what ``request`` asks for; a part that fails is reported in ``error``, not raised."""
        timing, errors = None, []
        if request.model_shape:
            try:
                timing = await self.layer_timing(request.model_shape, request.dtype, fresh=request.fresh)
            except SteppedAside:
                errors.append("layer benchmark stepped aside: answers arrived while it ran")
            except (PeerpipeError, ValueError, RuntimeError) as exc:
                errors.append(f"layer benchmark failed: {exc}")
        links, failed = await measure_links(node, request.links_to)
        if failed:
            errors.append(f"links not measured: {failed}")
        bench = self.bench
        return BenchmarkResult(
            score=bench.tflops,
            request_id=request.request_id,
            matmul_tflops=bench.tflops,
            memory_bandwidth_gbps=bench.memory_gbps,
            latency_ms=bench.launch_ms,
            timing=timing,
            links=links,
            error="; ".join(errors)[:4000],
        )
