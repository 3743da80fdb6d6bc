"""The cost model shared by every strategy: memory a stage needs, time a step takes.

The optimal planner's dynamic programme adds up exactly these terms, and every plan, whichever
strategy made it, is scored by :func:`evaluate`, so strategies are compared on one scale.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peerpipe.plan.spec import (
    PREFILL_TOKENS,
    TOKEN_MESSAGE_BYTES,
    Budget,
    ModelSpec,
    Network,
    NodeSpec,
    Objective,
)
from peerpipe.plan.wire import hidden_hop_ms


@dataclass(frozen=True)
class StagePlan:
    """Node ``node_id`` holds layers ``[start, end)``; it needs ``memory_bytes`` and spends
    ``compute_ms`` per decode step."""

    node_id: str
    start: int
    end: int
    memory_bytes: int
    compute_ms: float

    @property
    def layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PlanResult:
    """A plan and what it is predicted to do.

    ``predicted_ms_per_token`` is one answer's decode step, network hops included (the entry node
    sends the token to the first stage and gets the next one back from the last).
    ``throughput_tokens_per_s`` is what a pipeline kept full by many answers delivers: one token
    per slowest step. ``predicted_prefill_ms`` is the first token of a 128-token prompt.
    """

    strategy: str
    objective: Objective
    entry: str
    stages: tuple[StagePlan, ...]
    predicted_ms_per_token: float
    throughput_tokens_per_s: float
    predicted_prefill_ms: float
    exact: bool = True
    unused: tuple[str, ...] = ()

    @property
    def predicted_tokens_per_s(self) -> float:
        return 1e3 / self.predicted_ms_per_token

    @property
    def bottleneck_ms(self) -> float:
        return 1e3 / self.throughput_tokens_per_s

    def score(self) -> float:
        """The figure the objective minimises."""
        if self.objective is Objective.THROUGHPUT:
            return self.bottleneck_ms
        return self.predicted_ms_per_token

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "objective": self.objective.value,
            "entry": self.entry,
            "stages": [{"node": s.node_id, "start": s.start, "end": s.end} for s in self.stages],
            "details": [
                {"node_id": s.node_id, "memory_bytes": s.memory_bytes, "compute_ms": round(s.compute_ms, 4)}
                for s in self.stages
            ],
            "predicted_ms_per_token": round(self.predicted_ms_per_token, 4),
            "predicted_tokens_per_s": round(self.predicted_tokens_per_s, 3),
            "throughput_tokens_per_s": round(self.throughput_tokens_per_s, 3),
            "predicted_prefill_ms": round(self.predicted_prefill_ms, 3),
            "exact": self.exact,
            "unused": list(self.unused),
        }


def stage_memory(model: ModelSpec, budget: Budget, start: int, end: int, layer_scale: float = 1.0) -> int:
    """Bytes a node needs to hold layers ``[start, end)`` with their KV cache (its layers'
    matrices at ``layer_scale`` of the model's dtype when it quantizes them)."""
    first, last = start == 0, end == model.num_layers
    need = (end - start) * (int(model.layer_bytes * layer_scale) + budget.kv_bytes_per_layer(model))
    need += first * model.embed_bytes + last * model.head_bytes
    if first and last and model.tied_embeddings:
        need -= model.embed_bytes  # one matrix serves as embedding and head
    return need


def capacity(
    model: ModelSpec, budget: Budget, memory_bytes: int, first: bool, last: bool, layer_scale: float = 1.0
) -> int:
    """The most layers a node can hold, as first and/or last stage or neither (may be 0)."""
    fixed = first * model.embed_bytes + last * model.head_bytes
    if first and last and model.tied_embeddings:
        fixed -= model.embed_bytes
    per_layer = int(model.layer_bytes * layer_scale) + budget.kv_bytes_per_layer(model)
    room = budget.usable(memory_bytes) - fixed
    if room < per_layer:
        return 0
    return min(model.num_layers, room // per_layer) if per_layer else model.num_layers


def stage_compute_ms(model: ModelSpec, node: NodeSpec, start: int, end: int) -> float:
    return (end - start) * node.decode_layer_ms + node.stage_ms + (end == model.num_layers) * node.head_ms


def _prefill_ms(model: ModelSpec, node: NodeSpec, start: int, end: int) -> float:
    per_layer = node.prefill_layer_ms * PREFILL_TOKENS / node.prefill_tokens
    if per_layer <= 0:
        per_layer = node.decode_layer_ms * PREFILL_TOKENS
    return (end - start) * per_layer + node.stage_ms + (end == model.num_layers) * node.head_ms


def evaluate(
    model: ModelSpec,
    nodes: Mapping[str, NodeSpec],
    network: Network,
    budget: Budget,
    entry: str,
    ranges: Sequence[tuple[str, int, int]],
    *,
    strategy: str,
    objective: Objective = Objective.LATENCY,
    exact: bool = True,
) -> PlanResult:
    """Score the plan ``ranges`` (``(node_id, start, end)`` in pipeline order)."""
    stages = tuple(
        StagePlan(
            node_id,
            start,
            end,
            stage_memory(model, budget, start, end, nodes[node_id].layer_scale),
            stage_compute_ms(model, nodes[node_id], start, end),
        )
        for node_id, start, end in ranges
    )
    path = [s.node_id for s in stages]
    hops = [hidden_hop_ms(model, network, a, b) for a, b in itertools.pairwise(path)]
    ring = [
        network.hop_ms(entry, path[0], TOKEN_MESSAGE_BYTES),
        network.hop_ms(path[-1], entry, TOKEN_MESSAGE_BYTES),
    ]
    latency = sum(s.compute_ms for s in stages) + sum(hops) + sum(ring)
    bottleneck = max([s.compute_ms for s in stages] + hops + ring)
    prefill = sum(_prefill_ms(model, nodes[s.node_id], s.start, s.end) for s in stages)
    prefill += sum(hidden_hop_ms(model, network, a, b, PREFILL_TOKENS) for a, b in itertools.pairwise(path))
    prefill += network.hop_ms(entry, path[0], PREFILL_TOKENS * 8) + ring[1]
    return PlanResult(
        strategy=strategy,
        objective=objective,
        entry=entry,
        stages=stages,
        predicted_ms_per_token=latency,
        throughput_tokens_per_s=1e3 / bottleneck,
        predicted_prefill_ms=prefill,
        exact=exact,
        unused=tuple(sorted(set(nodes) - set(path))),
    )
