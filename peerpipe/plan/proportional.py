"""The seed's strategy: layers in proportion to each node's score, in order of score.

32 layers over scores 50/31/19 % give 16/10/6. Shares are rounded by largest remainder; a node
given more than its memory holds keeps what fits and the rest is shared out again among the
others by score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from peerpipe.plan.cost import PlanResult, capacity, evaluate
from peerpipe.plan.spec import Budget, ModelSpec, Network, NodeSpec, Objective


def split_by_score(total: int, scores: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``scores`` (largest remainder; ties go to the earlier)."""
    weight = sum(scores)
    if total <= 0 or weight <= 0:
        return [0] * len(scores)
    exact = [total * s / weight for s in scores]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(scores)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _layers(model: ModelSpec, budget: Budget, nodes: Sequence[NodeSpec]) -> list[int] | None:
    """Shares that respect memory, or None if the nodes cannot hold the model this way."""
    n_layers = model.num_layers
    fixed: dict[int, int] = {}  # node index -> layers capped by its memory
    for _ in range(len(nodes) + 1):
        free = [i for i in range(len(nodes)) if i not in fixed]
        shares = dict(fixed)
        shares.update(zip(free, split_by_score(n_layers - sum(fixed.values()), [nodes[i].score for i in free]), strict=True))
        active = [i for i in range(len(nodes)) if shares[i] > 0]
        if not active or sum(shares.values()) != n_layers:
            return None
        over = []
        for pos, i in enumerate(active):
            cap = capacity(model, budget, nodes[i].memory_bytes, pos == 0, pos == len(active) - 1, nodes[i].layer_scale)
            if shares[i] > cap:
                over.append((i, cap))
        if not over:
            return [shares[i] for i in range(len(nodes))]
        for i, cap in over:
            fixed[i] = cap
        if len(fixed) == len(nodes):
            return None
    return None


def plan_proportional(
    model: ModelSpec,
    nodes: Sequence[NodeSpec],
    network: Network,
    budget: Budget,
    entry: str,
    *,
    objective: Objective = Objective.LATENCY,
) -> PlanResult | None:
    ranked = sorted((n for n in nodes if n.score > 0), key=lambda n: -n.score)
    shares = _layers(model, budget, ranked)
    if shares is None:
        return None
    ranges = []
    cursor = 0
    for node, count in zip(ranked, shares, strict=True):
        if count:
            ranges.append((node.node_id, cursor, cursor + count))
            cursor += count
    by_id = {n.node_id: n for n in nodes}
    return evaluate(model, by_id, network, budget, entry, ranges, strategy="proportional", objective=objective)
