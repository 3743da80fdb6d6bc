"""A node's stage across plans: load the layers a plan gives this node, serve them, swap them
when the plan changes.

Loading checks first that the model folder is the room's model (same shape) and that the stage
fits in the memory this node offers, then reads only that layer range from disk, reporting
progress. The stage's server runs in this runtime's task group.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from peerpipe.compute import run_compute
from peerpipe.dtypes import ITEMSIZE
from peerpipe.errors import PeerpipeError
from peerpipe.inference.errors import StageLoadError
from peerpipe.inference.stage_server import StageServer, StageStats
from peerpipe.logs import Report, log_reporter
from peerpipe.plan import Budget, ModelSpec, fmt_bytes, stage_memory
from peerpipe.protocol import Cancel, ComputeRequest, DistributionPlan
from peerpipe.room import Send

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Loaded:
    start: int
    end: int
    dtype: str
    context: int
    sessions: int


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
    ) -> None:
        self.node_id = node_id
        self.label = label
        self.model_dir = model_dir
        self.device = device
        self.memory_bytes = memory_bytes
        self.send = send
        self.report = report or log_reporter(log)
        self.server: StageServer | None = None
        self.stats = StageStats()  # every stage this node served, across plans
        self.loading = False
        self._loaded: _Loaded | None = None
        self._worker: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        # Plans apply one at a time, in the order they came: a later plan that keeps the layers an
        # earlier one is still loading must find them loaded, not load them again.
        self._applying = asyncio.Lock()

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await stop.wait()
            self._stop_worker()
        self._tg = None

    def submit(self, message: ComputeRequest | Cancel) -> bool:
        """Hand a data-plane message to the stage; False when this node serves none."""
        if self.server is None:
            return False
        self.server.submit(message)
        return True

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    async def apply(self, message: DistributionPlan, host_id: str) -> str:
        """Take this node's part of the plan; returns "" or why it could not."""
        try:
            async with self._applying:
                await self._apply(message, host_id)
        except (PeerpipeError, RuntimeError, OSError, ValueError) as exc:
            self._stop_worker()
            self.server, self._loaded = None, None
            return str(exc)
        return ""

    async def _apply(self, message: DistributionPlan, host_id: str) -> None:
        plan = message.plan
        mine = [i for i, s in enumerate(plan.stages) if s.node_id == self.node_id]
        if not mine:
            self._stop_worker()
            self.server, self._loaded = None, None
            return
        index = mine[0]
        stage_plan = plan.stages[index]
        next_hop = plan.stages[index + 1].node_id if index + 1 < len(plan.stages) else None
        want = _Loaded(stage_plan.start, stage_plan.end, message.dtype, message.context_tokens, message.sessions)
        if self.server is not None and self._loaded == want:
            # Same layers: keep the weights and every session, so answers the host keeps running
            # (the same stages) go on, and those it replays roll their sessions back.
            self.server.next_hop, self.server.host_id = next_hop, host_id
            return
        self._stop_worker()
        self.server = None
        stage, cache = await self._load(message, want)
        label = f"{self.label} layers [{want.start}, {want.end})"
        self.server = StageServer(
            stage, cache, label=label, next_hop=next_hop, host_id=host_id, send=self.send, stats=self.stats
        )
        self._loaded = want
        assert self._tg is not None, "call run() first"
        self._worker = self._tg.create_task(self.server.run())

    async def _load(self, message: DistributionPlan, want: _Loaded):  # type: ignore[no-untyped-def]
        from peerpipe.engine.config import ModelConfig
        from peerpipe.engine.loader import load_stage

        if self.model_dir is None:
            raise StageLoadError("the plan gives this node layers, but it has no model: join with --model DIR")
        cfg = ModelConfig.from_dir(self.model_dir)
        if message.shape_key and cfg.shape_key != message.shape_key:
            raise StageLoadError(
                f"{self.model_dir} is not the room's model (shape {cfg.shape_key}, the room plans {message.shape_key})"
            )
        if cfg.n_layers != message.plan.num_layers:
            raise StageLoadError(f"{self.model_dir} has {cfg.n_layers} layers, the plan {message.plan.num_layers}")
        dtype = message.dtype or "float32"
        spec = ModelSpec.from_config(cfg, message.plan.model_id, ITEMSIZE.get(dtype, 4))
        need = stage_memory(spec, Budget(want.context or 1, want.sessions or 1, headroom=0.0), want.start, want.end)
        if need > self.memory_bytes:
            raise StageLoadError(
                f"layers [{want.start}, {want.end}) need {fmt_bytes(need)} with their KV cache; this node "
                f"offers {fmt_bytes(self.memory_bytes)}"
            )
        self.loading = True
        self.report(f"loading layers [{want.start}, {want.end}) of {message.plan.model_id} ({fmt_bytes(need)})")
        marks = {25, 50, 75}

        def progress(done: int, total: int) -> None:
            pct = 100 * done // max(1, total)
            for mark in sorted(marks):
                if pct >= mark:
                    marks.discard(mark)
                    self.report(f"loading layers [{want.start}, {want.end}): {mark}%")

        try:
            stage, stats = await run_compute(
                load_stage, self.model_dir, want.start, want.end, device=self.device, dtype=dtype, progress=progress, cfg=cfg
            )
            cache = await run_compute(stage.new_cache, max(1, want.sessions), max(2, want.context))
        finally:
            self.loading = False
        self.report(f"loaded layers [{want.start}, {want.end}): {stats.bytes_read / 1e6:.1f} MB read")
        return stage, cache
