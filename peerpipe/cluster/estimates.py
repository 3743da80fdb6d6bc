"""Predicted against measured: each stage's decode step as the plan predicted it and as the
stage's heartbeats report it.

A layer timing that is off by more than ``TOLERANCE`` times (a benchmark taken while the machine
was busy, a driver or clock that changed since) is measured again, bypassing the node's cache,
once the room is idle: the node's cache then holds the real figure, and the next plan uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from peerpipe.protocol import MemberState, Plan

TOLERANCE = 2.0
MIN_STEPS = 16  # decode steps since the plan before a stage's figure is trusted
CHECK_EVERY_S = 1.0
TRIES = 3  # re-measures of one node per plan that may come back empty


@dataclass(frozen=True)
class StageEstimate:
    node_id: str
    predicted_ms: float  # per decode step, 0 when the plan has no prediction for the stage
    measured_ms: float | None  # per decode step since the plan, None before MIN_STEPS
    steps: int

    @property
    def off(self) -> bool:
        """Measured and predicted disagree by more than the tolerance, either way."""
        if self.measured_ms is None or self.predicted_ms <= 0:
            return False
        ratio = self.measured_ms / self.predicted_ms
        return ratio > TOLERANCE or ratio < 1 / TOLERANCE


Baselines = dict[str, tuple[int, float]]  # node -> (steps, compute_s) when the plan began


def stage_estimates(plan: Plan, members: Sequence[MemberState], baselines: Baselines) -> list[StageEstimate]:
    """Each stage of ``plan``: predicted and measured ms per decode step (pure)."""
    by_id = {m.info.node_id: m for m in members}
    out = []
    for stage in plan.stages:
        member = by_id.get(stage.node_id)
        if member is None:
            continue
        steps0, seconds0 = baselines.get(stage.node_id, (0, 0.0))
        steps = member.steps - steps0
        measured = (member.compute_s - seconds0) * 1e3 / steps if steps >= MIN_STEPS else None
        out.append(StageEstimate(stage.node_id, stage.predicted_ms, measured, max(steps, 0)))
    return out


class EstimateWatch:
    """Keeps the baselines of the current plan and re-measures a node whose figure is off.

    ``remeasure(node_id)`` does the measuring (the rollout's); ``idle()`` says the room runs no
    answers, so a fresh benchmark competes with nothing."""

    def __init__(
        self,
        plan: Callable[[], Plan | None],
        members: Callable[[], Sequence[MemberState]],
        idle: Callable[[], bool],
        remeasure: Callable[[str, StageEstimate], Awaitable[bool]],
    ) -> None:
        self._plan = plan
        self._members = members
        self._idle = idle
        self._remeasure = remeasure
        self._version = -1
        self.baselines: Baselines = {}
        self.remeasured: set[str] = set()  # once per node and plan: a figure that stays off is the real one
        self.tries: dict[str, int] = {}  # re-measures that brought no figure back (stepped aside, failed)

    def begin(self, plan: Plan) -> None:
        """``plan`` is being sent out: what each node has run so far is not this plan's. Called
        before any stage can run it (a first look later could miss a short answer entirely)."""
        self._version = plan.version
        self.baselines = {m.info.node_id: (m.steps, m.compute_s) for m in self._members()}
        self.remeasured = set()
        self.tries = {}

    def estimates(self) -> list[StageEstimate]:
        plan = self._plan()
        if plan is None:
            return []
        if plan.version != self._version:
            self.begin(plan)
        return stage_estimates(plan, self._members(), self.baselines)

    async def check(self) -> None:
        """Re-measure each stage whose figure is off, once per plan, while the room is idle; one
        that brought no figure back (it stepped aside for answers, say) is tried again at the
        next idle check, up to ``TRIES`` times."""
        for estimate in self.estimates():
            node = estimate.node_id
            if estimate.off and node not in self.remeasured and self._idle():
                self.remeasured.add(node)
                version = self._version
                if not await self._remeasure(node, estimate) and version == self._version:  # not a newer plan's
                    self.tries[node] = self.tries.get(node, 0) + 1
                    if self.tries[node] < TRIES:
                        self.remeasured.discard(node)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            await self.check()
