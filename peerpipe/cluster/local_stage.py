"""What the cluster needs of this node's own stage: whether it is loading, how much it has
computed (heartbeats carry both) and a way to hand it a plan. Inference's ``StageRuntime`` is
one; the cluster never imports it."""

from __future__ import annotations

from typing import Protocol

from peerpipe.protocol import DistributionPlan


class StageCounters(Protocol):
    @property
    def steps(self) -> int: ...
    @property
    def compute_s(self) -> float: ...


class LocalStage(Protocol):
    @property
    def loading(self) -> bool: ...
    @property
    def stats(self) -> StageCounters: ...

    async def apply(self, message: DistributionPlan, host_id: str) -> str:
        """Take this node's part of the plan; "" or why it could not."""
        ...

    async def prefetch(self, message: DistributionPlan, host_id: str) -> str:
        """Fetch (not load) the layers the plan gives this node; "" or why it could not."""
        ...

    async def held_layers(self, manifest_id: str) -> tuple[int, ...]:
        """Layers of the copy ``manifest_id`` this node holds verified (the planner keeps them here)."""
        ...
