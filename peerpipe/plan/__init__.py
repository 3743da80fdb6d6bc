"""The distribution planner: a pure function from model, nodes and links to pipeline stages.

``make_plan`` is the entry point; ``optimal`` and ``proportional`` are the strategies and
``cost`` the model of time and memory they share. See docs/planner.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from peerpipe.plan.cost import PlanResult, StagePlan, capacity, evaluate, stage_memory
from peerpipe.plan.errors import DoesNotFitError, NoNodesError, PlanError
from peerpipe.plan.optimal import plan_optimal
from peerpipe.plan.proportional import plan_proportional, split_by_score
from peerpipe.plan.spec import DEFAULT_LINK, Budget, Link, ModelSpec, Network, NodeSpec, Objective

STRATEGIES = ("optimal", "proportional")


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def make_plan(
    model: ModelSpec,
    nodes: Sequence[NodeSpec],
    network: Network | None = None,
    budget: Budget | None = None,
    *,
    entry: str | None = None,
    strategy: str = "optimal",
    objective: Objective | str = Objective.LATENCY,
    time_budget_s: float = 0.5,
) -> PlanResult:
    """Plan ``model`` over ``nodes``. ``entry`` (default: the first node) tokenizes the prompt and
    receives every sampled token. Raises ``DoesNotFitError`` with the missing memory."""
    if not nodes:
        raise NoNodesError("there are no nodes to plan for")
    if len({n.node_id for n in nodes}) != len(nodes):
        raise PlanError("two nodes share one node id")
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    network = network or Network()
    budget = budget or Budget()
    objective = Objective(objective)
    entry = entry or nodes[0].node_id
    proportional = plan_proportional(model, nodes, network, budget, entry, objective=objective)
    if strategy == "proportional":
        result = proportional
    else:
        seeds = [[s.node_id for s in proportional.stages]] if proportional else []
        result = plan_optimal(
            model,
            nodes,
            network,
            budget,
            entry,
            objective=objective,
            seed_orders=seeds,
            time_budget_s=time_budget_s,
        )
    if result is None:
        raise _does_not_fit(model, nodes, budget, strategy)
    return result


def _does_not_fit(model: ModelSpec, nodes: Sequence[NodeSpec], budget: Budget, strategy: str) -> DoesNotFitError:
    kv = model.num_layers * budget.kv_bytes_per_layer(model)
    need = model.total_weight_bytes + kv
    offered = sum(budget.usable(n.memory_bytes) for n in nodes)
    what = (
        f"{model.model_id} needs {fmt_bytes(need)} ({fmt_bytes(model.total_weight_bytes)} of weights "
        f"+ {fmt_bytes(kv)} of KV cache for {budget.sessions} x {budget.tokens(model)} tokens)"
    )
    offer = f"the {len(nodes)} node(s) offer {fmt_bytes(offered)} after keeping {budget.headroom:.0%} of each free"
    if need > offered:
        missing = need - offered
        return DoesNotFitError(
            f"{what}; {offer}: {fmt_bytes(missing)} missing. Add a node, or lower the context "
            "or the number of sessions.",
            missing,
        )
    biggest = max(budget.usable(n.memory_bytes) for n in nodes)
    smallest_end = min(model.embed_bytes, model.head_bytes) + model.layer_bytes + budget.kv_bytes_per_layer(model)
    missing = max(0, smallest_end - biggest)
    how = "in proportion to score" if strategy == "proportional" else "into contiguous ranges"
    return DoesNotFitError(
        f"{what}; {offer}, but it cannot be split {how}: the first and last stages must also hold "
        f"the embedding or the head ({fmt_bytes(model.embed_bytes)}), and the largest node offers "
        f"{fmt_bytes(biggest)}. Try --strategy optimal, add a larger node, or lower the context.",
        missing,
    )


__all__ = [
    "DEFAULT_LINK",
    "STRATEGIES",
    "Budget",
    "DoesNotFitError",
    "Link",
    "ModelSpec",
    "Network",
    "NoNodesError",
    "NodeSpec",
    "Objective",
    "PlanError",
    "PlanResult",
    "StagePlan",
    "capacity",
    "evaluate",
    "fmt_bytes",
    "make_plan",
    "plan_optimal",
    "plan_proportional",
    "split_by_score",
    "stage_memory",
]
