"""Keeping layers where they already are: among plans as fast as the planner's best (within a
tolerance), the one that makes nodes fetch the fewest bytes from peers.

A node that holds a verified copy of some layers (its own folder, or what it fetched for an
earlier plan) loads them from disk; any other layer crosses the network first, which on a slow
link takes minutes. The searches of ``optimal.py`` place layer *counts*; this pass then swaps
whole ranges between nodes (or to an unused node) when the swap fetches less and predicts no
worse than ``tolerance`` slower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from peerpipe.plan.cost import PlanResult, capacity, evaluate
from peerpipe.plan.spec import Budget, ModelSpec, Network, NodeSpec

TOLERANCE = 0.02
Ranges = list[tuple[str, int, int]]


@dataclass(frozen=True)
class Holdings:
    """Which layers each node holds, and who the nodes fetch from (the host)."""

    layers: Mapping[str, frozenset[int]]
    source: str = ""

    def fetch_bytes(self, model: ModelSpec, ranges: Ranges) -> int:
        return sum(
            model.layer_bytes * sum(1 for i in range(start, end) if i not in self.layers.get(node, frozenset()))
            for node, start, end in ranges
        )

    def fetch_s(self, model: ModelSpec, ranges: Ranges, network: Network) -> float:
        """The longest any node spends fetching, at its measured link to the source."""
        worst = 0.0
        for node, start, end in ranges:
            missing = sum(1 for i in range(start, end) if i not in self.layers.get(node, frozenset()))
            if missing and node != self.source:
                worst = max(worst, network.link(self.source, node).transfer_ms(missing * model.layer_bytes) / 1e3)
        return worst


def prefer_held(
    result: PlanResult,
    model: ModelSpec,
    nodes: Mapping[str, NodeSpec],
    network: Network,
    budget: Budget,
    held: Holdings,
    tolerance: float = TOLERANCE,
) -> PlanResult:
    ranges: Ranges = [(s.node_id, s.start, s.end) for s in result.stages]
    limit = result.score() * (1 + tolerance)
    best, fetch = result, held.fetch_bytes(model, ranges)
    improved = True
    while improved and fetch:
        improved = False
        for candidate in _swaps(ranges, list(nodes)):
            if not _fits(candidate, model, nodes, budget):
                continue
            cost = held.fetch_bytes(model, candidate)
            if cost >= fetch:
                continue
            scored = evaluate(
                model, nodes, network, budget, result.entry, candidate, strategy=result.strategy,
                objective=result.objective, exact=False,
            )
            if scored.score() <= limit:
                best, fetch, ranges, improved = scored, cost, candidate, True
                break
    return best


def _swaps(ranges: Ranges, node_ids: list[str]) -> list[Ranges]:
    """Every plan that exchanges two stages' nodes, or gives one stage's range to an unused node."""
    used = [n for n, _, _ in ranges]
    out: list[Ranges] = []
    for i in range(len(ranges)):
        for j in range(i + 1, len(ranges)):
            swapped = list(ranges)
            swapped[i] = (ranges[j][0], *ranges[i][1:])
            swapped[j] = (ranges[i][0], *ranges[j][1:])
            out.append(swapped)
        for other in node_ids:
            if other not in used:
                moved = list(ranges)
                moved[i] = (other, *ranges[i][1:])
                out.append(moved)
    return out


def _fits(ranges: Ranges, model: ModelSpec, nodes: Mapping[str, NodeSpec], budget: Budget) -> bool:
    for node_id, start, end in ranges:
        node = nodes[node_id]
        first, last = start == 0, end == model.num_layers
        if capacity(model, budget, node.memory_bytes, first, last, node.layer_scale) < end - start:
            return False
    return True
