"""The optimal strategy: contiguous layer ranges that minimise predicted latency (or the
pipeline's slowest step), with memory as a hard limit.

Two exact searches, both dynamic programmes over "layers placed so far" with the cost terms of
:mod:`peerpipe.plan.cost`:

* **Uniform network** (every pair of nodes linked alike, the usual one-switch LAN and every
  hypothetical room): the order of the middle stages changes nothing, only which node is first
  (it holds the embedding and gets the token from the entry) and last (head, returns the token).
  A knapsack over nodes with roles skip / first / middle / last is exact, in O(nodes x layers^2).
* **Measured, unequal links**: the order matters. For each node order a DP places ranges along
  it (a node may be skipped). Every order is tried up to ``EXHAUSTIVE_NODES`` nodes, which is
  exact; beyond, seeded orders are improved by swaps until a time budget runs out.

Nodes that would slow the answer down (a slow device, a slow link) are simply skipped.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from peerpipe.plan.cost import PlanResult, capacity, evaluate
from peerpipe.plan.spec import TOKEN_MESSAGE_BYTES, Budget, ModelSpec, Network, NodeSpec, Objective
from peerpipe.plan.wire import hidden_hop_ms

EXHAUSTIVE_NODES = 6
INF = float("inf")
Ranges = list[tuple[str, int, int]]


@dataclass(frozen=True)
class _Problem:
    model: ModelSpec
    nodes: tuple[NodeSpec, ...]
    network: Network
    budget: Budget
    entry: str
    objective: Objective
    hops: np.ndarray  # hops[a, b]: ms to send one token's hidden state from node a to node b

    @property
    def adds(self) -> bool:
        return self.objective is Objective.LATENCY

    def caps(self, node: NodeSpec) -> dict[tuple[bool, bool], int]:
        return _caps(self.model, self.budget, node.memory_bytes, node.layer_scale)

    def entry_hop(self, node: NodeSpec) -> float:
        return self.network.hop_ms(self.entry, node.node_id, TOKEN_MESSAGE_BYTES)

    def exit_hop(self, node: NodeSpec) -> float:
        return self.network.hop_ms(node.node_id, self.entry, TOKEN_MESSAGE_BYTES)


@functools.lru_cache(maxsize=4096)
def _caps(model: ModelSpec, budget: Budget, memory_bytes: int, layer_scale: float = 1.0) -> dict[tuple[bool, bool], int]:
    """Layers a node can hold as (first, last) stage; asked for once per node and order."""
    return {
        (f, g): capacity(model, budget, memory_bytes, f, g, layer_scale) for f in (False, True) for g in (False, True)
    }


@functools.lru_cache(maxsize=16)
def _grid(n_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count[l, l2] = l2 - l`` over start ``l`` in ``[0, L]`` and end ``l2`` in ``[0, L]``."""
    ends = np.arange(n_layers + 1)
    grids = (ends[None, :] - ends[:, None], ends[:, None] == 0, ends[None, :] == n_layers)
    for grid in grids:
        grid.flags.writeable = False  # shared by every call: cached
    return grids


def _extend(
    prob: _Problem,
    value: np.ndarray,
    node: NodeSpec,
    cap: np.ndarray | int,
    extra: np.ndarray | float,
    head: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray]:
    """Give ``node`` one range after any state in ``value`` (indexed by layers placed): the best
    new value per end layer, and the start layer it came from. ``extra`` (network) and ``head``
    (added to the stage's compute) may vary with the end layer."""
    count, _, _ = _grid(prob.model.num_layers)
    stage = count * node.decode_layer_ms + head
    if prob.adds:
        total = value[:, None] + stage + extra
    else:
        total = np.maximum(np.maximum(value[:, None], stage), extra)
    total = np.where((count >= 1) & (count <= cap), total, INF)
    start = total.argmin(axis=0)
    return total[start, np.arange(total.shape[1])], start


def _single_stage(prob: _Problem) -> tuple[float, Ranges] | None:
    best: tuple[float, Ranges] | None = None
    n_layers = prob.model.num_layers
    for node in prob.nodes:
        if capacity(prob.model, prob.budget, node.memory_bytes, True, True, node.layer_scale) < n_layers:
            continue
        compute = n_layers * node.decode_layer_ms + node.stage_ms + node.head_ms
        ends = (prob.entry_hop(node), prob.exit_hop(node))
        score = compute + sum(ends) if prob.adds else max(compute, *ends)
        if best is None or score < best[0]:
            best = (score, [(node.node_id, 0, n_layers)])
    return best


def _knapsack(prob: _Problem, hop: float) -> tuple[float, Ranges] | None:
    """Exact when every hop between two nodes costs ``hop``: plans of two or more stages."""
    n_layers = prob.model.num_layers
    both = (lambda a, b: a + b) if prob.adds else max
    # value[f, g, l]: best cost with l layers placed, a first stage placed (f), a last placed (g).
    value = np.full((2, 2, n_layers + 1), INF)
    value[0, 0, 0] = 0.0 if prob.adds else -INF
    # choices[k][f, g, l] = (role, start) that reached the state at node k; role 0 = skipped.
    choices: list[tuple[np.ndarray, np.ndarray]] = []
    for node in prob.nodes:
        caps = prob.caps(node)
        new = value.copy()
        role = np.zeros(value.shape, dtype=np.int8)
        start = np.zeros(value.shape, dtype=np.int64)
        # Roles: 1 middle, 2 first, 3 last. Layers placed so far are a count, not a position:
        # where a middle stage sits does not matter on a uniform network. Every stage pays one
        # hop here; a pipeline of s stages has s - 1, corrected at the end.
        options = (
            (1, caps[(False, False)], hop, node.stage_ms),
            (2, caps[(True, False)], both(hop, prob.entry_hop(node)), node.stage_ms),
            (3, caps[(False, True)], both(hop, prob.exit_hop(node)), node.stage_ms + node.head_ms),
        )
        for code, cap, extra, head in options:
            if cap < 1:
                continue
            for f, g in itertools.product((0, 1), (0, 1)):
                if (code == 2 and f) or (code == 3 and g):
                    continue
                to_f, to_g = (1 if code == 2 else f), (1 if code == 3 else g)
                got, came = _extend(prob, value[f, g], node, cap, extra, head)
                better = got < new[to_f, to_g]
                new[to_f, to_g] = np.where(better, got, new[to_f, to_g])
                role[to_f, to_g] = np.where(better, code * 4 + f * 2 + g, role[to_f, to_g])
                start[to_f, to_g] = np.where(better, came, start[to_f, to_g])
        choices.append((role, start))
        value = new
    total = float(value[1, 1, n_layers])
    if total == INF:
        return None
    score = total - hop if prob.adds else total
    first: Ranges = []
    middle: Ranges = []
    last: Ranges = []
    f, g, layers = 1, 1, n_layers
    for node, (role, start) in zip(reversed(prob.nodes), reversed(choices), strict=True):
        code = int(role[f, g, layers])
        if code == 0:
            continue
        begin = int(start[f, g, layers])
        kind, f, g = code // 4, (code >> 1) & 1, code & 1
        {1: middle, 2: first, 3: last}[kind].append((node.node_id, begin, layers))
        layers = begin
    return score, _renumber(first + middle + last)


def _renumber(stages: Ranges) -> Ranges:
    """Lay the stages' layer counts end to end in pipeline order."""
    out: Ranges = []
    cursor = 0
    for node_id, begin, end in stages:
        out.append((node_id, cursor, cursor + end - begin))
        cursor += end - begin
    return out


def _along(prob: _Problem, order: Sequence[int]) -> tuple[float, Ranges] | None:
    """Exact best plan whose stages follow ``order`` (indices into ``prob.nodes``), skips allowed."""
    n_layers = prob.model.num_layers
    m = len(order)
    value = np.full((m, n_layers + 1), INF)
    came_from = np.full((m, n_layers + 1), -1, dtype=np.int64)
    began = np.zeros((m, n_layers + 1), dtype=np.int64)
    _, is_start, is_end = _grid(n_layers)
    last_col = np.arange(n_layers + 1) == n_layers
    columns = np.arange(n_layers + 1)
    for p, k in enumerate(order):
        node = prob.nodes[k]
        caps = prob.caps(node)
        cap = np.where(
            is_start,
            np.where(is_end, caps[(True, True)], caps[(True, False)]),
            np.where(is_end, caps[(False, True)], caps[(False, False)]),
        )
        # inbound[l]: best cost with layers [0, l) placed and their output on its way to node k.
        inbound = np.full(n_layers + 1, INF)
        source = np.full(n_layers + 1, -1, dtype=np.int64)
        inbound[0] = prob.entry_hop(node)
        if p:
            hops = prob.hops[list(order[:p]), k][:, None]
            cand = value[:p] + hops if prob.adds else np.maximum(value[:p], hops)
            best = cand.argmin(axis=0)
            got = cand[best, columns]
            better = got < inbound
            better[0] = False
            inbound = np.where(better, got, inbound)
            source = np.where(better, best, source)
        head = node.stage_ms + np.where(last_col, node.head_ms, 0.0)
        extra = np.where(last_col, prob.exit_hop(node), 0.0)
        row, start = _extend(prob, inbound, node, cap, extra, head)
        value[p], began[p], came_from[p] = row, start, source[start]
    p = int(value[:, n_layers].argmin())
    score = float(value[p, n_layers])
    if score == INF:
        return None
    ranges: Ranges = []
    layers = n_layers
    while p >= 0:
        begin = int(began[p, layers])
        ranges.append((prob.nodes[order[p]].node_id, begin, layers))
        p, layers = int(came_from[p, layers]), begin
    return score, ranges[::-1]


def _uniform_hop(prob: _Problem) -> float | None:
    """The hop cost shared by every pair of distinct nodes, or None if links differ. (Hops to and
    from the entry carry only a token and are costed exactly either way.)"""
    off = prob.hops[~np.eye(len(prob.nodes), dtype=bool)]
    if off.size == 0:
        return 0.0
    return float(off[0]) if np.allclose(off, off[0], rtol=0, atol=1e-9) else None


def _search_orders(
    prob: _Problem, seeds: list[list[int]], time_budget_s: float
) -> tuple[tuple[float, Ranges] | None, bool]:
    n = len(prob.nodes)
    if n <= EXHAUSTIVE_NODES:
        found = [r for order in itertools.permutations(range(n)) if (r := _along(prob, order))]
        return (min(found, key=lambda r: r[0]) if found else None), True
    deadline = time.perf_counter() + time_budget_s
    best: tuple[float, Ranges] | None = None
    best_order: list[int] = []
    for order in seeds:
        got = _along(prob, order)
        if got and (best is None or got[0] < best[0]):
            best, best_order = got, order
    if best is None:
        return None, False
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        used = len(best[1])
        for i, j in itertools.combinations(range(min(n, used + 2)), 2):
            if time.perf_counter() >= deadline:
                break
            order = list(best_order)
            order[i], order[j] = order[j], order[i]
            got = _along(prob, order)
            if got and got[0] < best[0] - 1e-12:
                best, best_order, improved = got, order, True
    return best, False


def plan_optimal(
    model: ModelSpec,
    nodes: Sequence[NodeSpec],
    network: Network,
    budget: Budget,
    entry: str,
    *,
    objective: Objective = Objective.LATENCY,
    seed_orders: Sequence[Sequence[str]] = (),
    time_budget_s: float = 0.5,
) -> PlanResult | None:
    """The best plan, or None when no placement fits (the caller explains why).

    ``seed_orders`` (node ids in pipeline order) are tried first when links differ: passing
    another strategy's order guarantees the result is never predicted worse than it."""
    ids = [n.node_id for n in nodes]
    hops = np.array([[hidden_hop_ms(model, network, a, b) for b in ids] for a in ids]).reshape(
        len(ids), len(ids)
    )
    prob = _Problem(model, tuple(nodes), network, budget, entry, objective, hops)
    found = [r for r in (_single_stage(prob),) if r]
    exact = True
    if len(nodes) > 1:
        hop = _uniform_hop(prob)
        if hop is not None:
            multi = _knapsack(prob, hop)
        else:
            multi, exact = _search_orders(prob, _seeds(prob, seed_orders), time_budget_s)
        if multi:
            found.append(multi)
    if not found:
        return None
    _, ranges = min(found, key=lambda r: r[0])
    by_id = {n.node_id: n for n in nodes}
    return evaluate(
        model, by_id, network, budget, entry, ranges, strategy="optimal", objective=objective, exact=exact
    )


def _seeds(prob: _Problem, seed_orders: Sequence[Sequence[str]]) -> list[list[int]]:
    """Starting orders for the search on unequal links: the callers', the plan for a uniform
    network with the mean hop, and fastest / slowest node first."""
    index = {n.node_id: i for i, n in enumerate(prob.nodes)}
    by_speed = sorted(range(len(prob.nodes)), key=lambda k: prob.nodes[k].decode_layer_ms)

    def complete(chosen: list[int]) -> list[int]:
        return chosen + [k for k in by_speed if k not in chosen]

    seeds = [complete([index[i] for i in order if i in index]) for order in seed_orders]
    mean_hop = float(prob.hops[~np.eye(len(prob.nodes), dtype=bool)].mean())
    if (uniform := _knapsack(prob, mean_hop)) is not None:
        seeds.append(complete([index[node_id] for node_id, _, _ in uniform[1]]))
    return [*seeds, by_speed, by_speed[::-1]]
