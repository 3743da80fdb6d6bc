"""Keeping layers where they are held: table tests of the pure pass after the planner."""

from __future__ import annotations

import pytest

from peerpipe.plan import Budget, ModelSpec, Network, NodeSpec, evaluate
from peerpipe.plan.reuse import Holdings, prefer_held

MODEL = ModelSpec(
    model_id="m", num_layers=8, layer_bytes=1_000_000, embed_bytes=100, head_bytes=100, kv_bytes_per_token=1,
    hidden_bytes=8, layer_flops=1000,
)
BUDGET = Budget(context_tokens=10, sessions=1, headroom=0.0)
BIG = 10**9


def node(name: str, ms: float = 1.0, memory: int = BIG) -> NodeSpec:
    return NodeSpec(name, memory, decode_layer_ms=ms, head_ms=0.01)


def ranges(result) -> list[tuple[str, int, int]]:  # type: ignore[no-untyped-def]
    return [(s.node_id, s.start, s.end) for s in result.stages]


PLAN = [("host", 0, 3), ("b", 3, 6), ("c", 6, 8)]


@pytest.mark.parametrize(
    ("held", "c_ms", "memory_c", "want"),
    [
        # c holds b's layers and b holds c's, alike nodes: they swap, nothing is fetched.
        ({"b": range(6, 8), "c": range(3, 6)}, 1.0, BIG, [("host", 0, 3), ("c", 3, 6), ("b", 6, 8)]),
        # nobody holds anything: the planner's plan stands.
        ({}, 1.0, BIG, PLAN),
        # c holds b's layers but is 3x slower: speed wins, they fetch instead.
        ({"b": range(6, 8), "c": range(3, 6)}, 3.0, BIG, PLAN),
        # c holds b's layers but has no memory for three of them: no swap.
        ({"b": range(6, 8), "c": range(3, 6)}, 1.0, 2_100_000, PLAN),
        # an unused node d holds c's layers: it takes them over.
        ({"d": range(6, 8)}, 1.0, BIG, [("host", 0, 3), ("b", 3, 6), ("d", 6, 8)]),
    ],
)
def test_of_plans_as_fast_the_one_that_fetches_least_is_kept(held, c_ms, memory_c, want) -> None:  # type: ignore[no-untyped-def]
    nodes = {n.node_id: n for n in (node("host"), node("b"), node("c", c_ms, memory_c), node("d"))}
    base = evaluate(MODEL, nodes, Network(), BUDGET, "host", PLAN, strategy="optimal")
    holdings = Holdings({"host": frozenset(range(8)), **{n: frozenset(r) for n, r in held.items()}}, source="host")
    after = prefer_held(base, MODEL, nodes, Network(), BUDGET, holdings)
    assert ranges(after) == want
    assert after.score() <= base.score() * 1.02
    assert holdings.fetch_bytes(MODEL, ranges(after)) <= holdings.fetch_bytes(MODEL, PLAN)


def test_the_fetch_time_is_the_slowest_node_at_its_link() -> None:
    from peerpipe.plan import Link

    net = Network({("host", "b"): Link(1.0, 1e6), ("host", "c"): Link(1.0, 1e7)})
    holdings = Holdings({"host": frozenset(range(8))}, source="host")
    plan = [("host", 0, 2), ("b", 2, 4), ("c", 4, 8)]
    assert holdings.fetch_bytes(MODEL, plan) == 6 * MODEL.layer_bytes
    assert holdings.fetch_s(MODEL, plan, net) == pytest.approx(2.0, rel=1e-3)  # b: 2 MB at 1 MB/s
