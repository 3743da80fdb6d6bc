"""A node's stages across plans: load the layer ranges a plan gives this node (its stages, and
standby copies of other nodes' stages), serve its stages, and change them when the plan does.

Loading checks first that the model folder is the room's model (same shape) and that everything
the plan gives this node fits in the memory it offers, then reads only those layer ranges from
disk, reporting progress. A range a new plan keeps stays loaded, with its sessions: answers the
host keeps running go on, and a standby promoted to a stage serves at once. Each stage's server
runs in this runtime's task group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerpipe.compute import run_compute
from peerpipe.dtypes import ITEMSIZE
from peerpipe.errors import PeerpipeError
from peerpipe.inference.errors import StageLoadError
from peerpipe.inference.stage_server import StageServer, StageStats
from peerpipe.logs import Report, log_reporter
from peerpipe.plan import Budget, ModelSpec, fmt_bytes, stage_memory
from peerpipe.plan.spec import layer_scale
from peerpipe.protocol import Cancel, ComputeRequest, DistributionPlan
from peerpipe.room import Send
from peerpipe.weights import NodeWeights

log = logging.getLogger(__name__)
Range = tuple[int, int]


@dataclass(frozen=True)
class _Shape:
    """What a loaded range was loaded for: a plan with another shape loads it again."""

    dtype: str
    context: int
    sessions: int
    quantize: str  # how this node holds the plan's layers

@dataclass
class _Held:
    stage: Any  # engine.model.Stage (torch loads only when a plan gives this node layers)
    cache: Any  # engine.kvcache.KVCache


class StageRuntime:
    def __init__(
        self,
        node_id: str,
        label: str,
        model_dir: Path | None,
        *,
        device: str,
        memory_bytes: int,
        send: Send,
        report: Report | None = None,
        quantize: str = "none",
        weights: NodeWeights | None = None,
    ) -> None:
        self.node_id = node_id
        self.weights = weights  # this node's copies: a plan naming another copy fetches from peers
        self.quantize = quantize  # how this node holds its layers' matrices (engine/quant.py)
        self.label = label
        self.model_dir = model_dir
        self.device = device
        self.memory_bytes = memory_bytes
        self.send = send
        self.report = report or log_reporter(log)
        self.servers: dict[int, StageServer] = {}  # this node's stages, by first layer
        self.stats = StageStats()  # every stage this node served, across plans
        self.loading = False
        self._held: dict[Range, _Held] = {}  # every loaded range: stages and standbys
        self._shape: _Shape | None = None
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None
        # Plans apply one at a time, in the order they came: a later plan that keeps the layers an
        # earlier one is still loading must find them loaded, not load them again.
        self._applying = asyncio.Lock()

    @property
    def server(self) -> StageServer | None:
        """The stage this node serves (the first, when a failover gave it several)."""
        return self.servers[min(self.servers)] if self.servers else None

    @property
    def standbys(self) -> list[Range]:
        """Ranges held loaded for another node's stage."""
        serving = {(s.stage.start, s.stage.end) for s in self.servers.values()}
        return sorted(set(self._held) - serving)

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await stop.wait()
            self._stop_servers(set(self.servers))
        self._tg = None

    def submit(self, message: ComputeRequest | Cancel) -> bool:
        """Hand a data-plane message to the stage it is for; False when this node serves none."""
        if isinstance(message, Cancel):
            for server in self.servers.values():
                server.submit(message)
            return bool(self.servers)
        server = self.servers.get(message.layer)
        if server is None:
            return False
        server.submit(message)
        return True

    def _stop_servers(self, starts: set[int]) -> None:
        for start in starts:
            worker = self._workers.pop(start, None)
            if worker is not None:
                worker.cancel()
            self.servers.pop(start, None)

    async def apply(self, message: DistributionPlan, host_id: str) -> str:
        """Take this node's part of the plan; returns "" or why it could not."""
        try:
            async with self._applying:
                await self._apply(message, host_id)
        except (PeerpipeError, RuntimeError, OSError, ValueError) as exc:
            self._stop_servers(set(self.servers))
            self._held.clear()
            return str(exc)
        return ""

    async def prefetch(self, message: DistributionPlan, host_id: str) -> str:
        """Fetch the layers ``message``'s plan gives this node and it lacks, serving on meanwhile;
        returns "" or why it could not. Nothing is loaded: the plan itself comes next."""
        plan = message.plan
        wanted = sorted({(s.start, s.end) for s in (*plan.stages, *plan.standbys) if s.node_id == self.node_id})
        quantize = self._mode(message)
        try:
            async with self._applying:
                missing = [r for r in wanted if r not in self._held]
                if missing:
                    await self._folder(
                        message, missing, host_id, lambda cfg: self._check_fits(message, cfg, wanted, quantize)
                    )
        except (PeerpipeError, RuntimeError, OSError, ValueError) as exc:
            return str(exc)
        return ""

    async def _apply(self, message: DistributionPlan, host_id: str) -> None:
        plan = message.plan
        stages = [(i, s) for i, s in enumerate(plan.stages) if s.node_id == self.node_id]
        wanted = {(s.start, s.end) for _, s in stages} | {(s.start, s.end) for s in plan.standbys if s.node_id == self.node_id}
        quantize = self._mode(message)
        shape = _Shape(message.dtype, message.context_tokens, message.sessions, quantize)
        if shape != self._shape:
            self._stop_servers(set(self.servers))
            self._held.clear()
        self._shape = shape
        missing = sorted(wanted - set(self._held))

        def check(cfg: Any) -> None:
            self._check_fits(message, cfg, sorted(wanted), quantize)

        # Layers this node lacks come from peers while its old stages still serve: only loading
        # needs their memory back.
        self.loading = bool(missing)
        try:
            folder = await self._folder(message, missing, host_id, check) if missing else None
        finally:
            self.loading = False
        # Ranges this plan drops go first (their memory is needed); kept ones keep their sessions.
        for gone in set(self._held) - wanted:
            del self._held[gone]
        self._stop_servers({start for start, server in self.servers.items() if (start, server.stage.end) not in wanted})
        if folder is not None:
            await self._load(message, missing, sorted(wanted), folder, quantize)
        for index, planned in stages:
            next_hop = plan.stages[index + 1].node_id if index + 1 < len(plan.stages) else None
            server = self.servers.get(planned.start)
            if server is not None:  # kept (or promoted earlier): only where it sends may change
                server.next_hop, server.host_id = next_hop, host_id
                server.micro_batches = plan.lanes or len(plan.stages)
                server.wire = planned.wire
                continue
            held = self._held[(planned.start, planned.end)]
            label = f"{self.label} layers [{planned.start}, {planned.end})"
            server = StageServer(
                held.stage, held.cache, label=label, next_hop=next_hop, host_id=host_id, send=self.send,
                stats=self.stats, micro_batches=plan.lanes or len(plan.stages), wire=planned.wire,
            )
            if server.graphed:
                began = time.perf_counter()
                count = await run_compute(server.warm)
                self.report(f"{label}: captured {count} decode graphs in {time.perf_counter() - began:.1f} s")
            self.servers[planned.start] = server
            assert self._tg is not None, "call run() first"
            self._workers[planned.start] = self._tg.create_task(server.run())

    async def _load(
        self, message: DistributionPlan, ranges: list[Range], wanted: list[Range], model_dir: Path, quantize: str
    ) -> None:
        from peerpipe.engine.config import ModelConfig
        from peerpipe.engine.loader import load_stage

        self.loading = True
        try:
            cfg = ModelConfig.from_dir(model_dir)
            need = self._check_fits(message, cfg, wanted, quantize)
            dtype = message.dtype or "float32"
            sessions, context = max(1, message.sessions), max(2, message.context_tokens)
            for start, end in ranges:
                role = "" if any(s.node_id == self.node_id and s.start == start for s in message.plan.stages) else " (standby)"
                held = f", {quantize} weights" if quantize != "none" else ""
                self.report(f"loading layers [{start}, {end}) of {message.plan.model_id}{role} ({fmt_bytes(need)}{held})")
                progress = _progress(self.report, f"loading layers [{start}, {end})")
                if self.device.startswith("webgpu"):  # WGSL kernels: this machine's adapter or a browser's
                    from peerpipe.webgpu.load import load_webgpu_stage

                    loader: Any = load_webgpu_stage
                    where: dict[str, Any] = {"device": self.device}
                else:
                    loader, where = load_stage, {"device": self.device}
                stage, stats = await run_compute(
                    loader, model_dir, start, end, dtype=dtype, progress=progress, cfg=cfg, quantize=quantize, **where
                )
                cache = await run_compute(stage.new_cache, sessions, context)
                self._held[(start, end)] = _Held(stage, cache)
                self.report(f"loaded layers [{start}, {end}): {stats.bytes_read / 1e6:.1f} MB read")
        finally:
            self.loading = False

    async def _folder(
        self, message: DistributionPlan, ranges: list[Range], host_id: str, check: Callable[[Any], None]
    ) -> Path:
        """Where to load from: this node's folder, or the copy fetched from peers when the plan
        names a copy this node's folder is not (or it has none)."""
        if self.weights is not None and message.manifest_id:
            if await self.weights.local_id() != message.manifest_id:
                holders = [host_id, *dict.fromkeys(s.node_id for s in (*message.plan.stages, *message.plan.standbys))]
                holders = [h for h in dict.fromkeys(holders) if h != self.node_id]
                shown = ", ".join(f"[{a}, {b})" for a, b in ranges)
                return await self.weights.prepare(message.manifest_id, ranges, holders, f"layers {shown}", check)
        if self.model_dir is None:
            raise StageLoadError("the plan gives this node layers, but it has no model: join with --model DIR")
        return self.model_dir

    def _mode(self, message: DistributionPlan) -> str:
        """How this node holds the plan's layers: as it was told, or as the plan says when it
        let the planner choose (``auto``)."""
        if self.quantize != "auto":
            return self.quantize
        modes = {s.quantize for s in (*message.plan.stages, *message.plan.standbys) if s.node_id == self.node_id}
        return next((m for m in modes if m), "none")

    def _check_fits(self, message: DistributionPlan, cfg: Any, wanted: list[Range], quantize: str) -> int:
        """The memory the plan's ranges need here, after checking the folder is the room's model."""
        if message.shape_key and cfg.shape_key != message.shape_key:
            raise StageLoadError(
                f"{self.model_dir} is not the room's model (shape {cfg.shape_key}, the room plans {message.shape_key})"
            )
        if cfg.n_layers != message.plan.num_layers:
            raise StageLoadError(f"{self.model_dir} has {cfg.n_layers} layers, the plan {message.plan.num_layers}")
        dtype = message.dtype or "float32"
        spec = ModelSpec.from_config(cfg, message.plan.model_id, ITEMSIZE.get(dtype, 4))
        budget = Budget(max(2, message.context_tokens), max(1, message.sessions), headroom=0.0)
        if quantize == "keep":  # as the GGUF stores each matrix: counted at the widest of them
            from peerpipe.engine.loader import keep_width

            quantize = keep_width(self.model_dir, cfg)
        scale = layer_scale(quantize, spec.dtype_bytes)
        need = sum(stage_memory(spec, budget, start, end, scale) for start, end in wanted)
        if need > self.memory_bytes:
            shown = ", ".join(f"[{a}, {b})" for a, b in wanted)
            raise StageLoadError(
                f"layers {shown} need {fmt_bytes(need)} with their KV cache; this node offers {fmt_bytes(self.memory_bytes)}"
            )
        return need

    async def held_layers(self, manifest_id: str) -> tuple[int, ...]:
        """Layers of copy ``manifest_id`` this node holds (the planner prefers to keep them here)."""
        return await self.weights.held_layers(manifest_id) if self.weights is not None else ()


def _progress(report: Report, what: str):  # type: ignore[no-untyped-def]
    marks = {25, 50, 75}

    def progress(done: int, total: int) -> None:
        pct = 100 * done // max(1, total)
        for mark in sorted(marks):
            if pct >= mark:
                marks.discard(mark)
                report(f"{what}: {mark}%")

    return progress
