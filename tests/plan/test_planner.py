"""The planner: table-driven cases, exactness against brute force, properties, speed."""

from __future__ import annotations

import dataclasses
import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerpipe.plan import (
    Budget,
    DoesNotFitError,
    Link,
    ModelSpec,
    Network,
    NodeSpec,
    Objective,
    PlanError,
    evaluate,
    make_plan,
    split_by_score,
    stage_memory,
)

MB = 1 << 20
GB = 1 << 30
FREE = Budget(context_tokens=1, sessions=1, headroom=0.0)


def model(layers: int = 32, layer_mb: int = 100, embed_mb: int = 200, tied: bool = False) -> ModelSpec:
    return ModelSpec(
        model_id="m",
        num_layers=layers,
        layer_bytes=layer_mb * MB,
        embed_bytes=embed_mb * MB,
        head_bytes=embed_mb * MB,
        kv_bytes_per_token=1024,
        hidden_bytes=4096,
        layer_flops=2 * layer_mb * MB // 2,
        tied_embeddings=tied,
    )


def node(name: str, ms: float, mem_gb: float = 100, score: float = 0.0) -> NodeSpec:
    return NodeSpec(name, int(mem_gb * GB), decode_layer_ms=ms, head_ms=2 * ms, score=score or 1 / ms)


def counts(plan) -> list[tuple[str, int]]:
    return [(s.node_id, s.layers) for s in plan.stages]


# -- the seed's rule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "scores", "expected"),
    [
        (32, [50, 31, 19], [16, 10, 6]),  # the seed's example
        (32, [1, 1, 1], [11, 11, 10]),
        (10, [1, 0], [10, 0]),
        (7, [3, 3, 1], [3, 3, 1]),
        (1, [1, 1], [1, 0]),
    ],
)
def test_split_by_score(total: int, scores: list[float], expected: list[int]) -> None:
    assert split_by_score(total, scores) == expected


def test_proportional_reproduces_the_seed_example() -> None:
    nodes = [node("a", 1, score=50), node("b", 1, score=31), node("c", 1, score=19)]
    plan = make_plan(model(), nodes, strategy="proportional", budget=FREE)
    assert counts(plan) == [("a", 16), ("b", 10), ("c", 6)]
    assert [(s.start, s.end) for s in plan.stages] == [(0, 16), (16, 26), (26, 32)]


def test_proportional_caps_a_node_by_memory_and_shares_out_the_rest() -> None:
    # "a" scores highest but holds only embedding + 4 layers.
    nodes = [node("a", 1, mem_gb=0.6, score=50), node("b", 1, score=31), node("c", 1, score=19)]
    plan = make_plan(model(), nodes, strategy="proportional", budget=FREE)
    assert counts(plan)[0] == ("a", 4)
    assert sum(n for _, n in counts(plan)) == 32
    assert dict(counts(plan))["b"] > dict(counts(plan))["c"]


# -- the optimal strategy: table-driven ---------------------------------------------------

TABLE = [
    # (case, nodes, links, expected layer counts in pipeline order)
    ("one node holds it all", [node("a", 1)], {}, [("a", 32)]),
    ("a fast node that fits takes everything", [node("a", 1), node("b", 3)], {}, [("a", 32)]),
    (
        # The fast node fills up and runs last, where the LM head costs it half what it costs "b".
        "memory-bound: the fast node fills up and takes the head",
        [node("a", 1, mem_gb=1.2), node("b", 2)],
        {},
        [("b", 22), ("a", 10)],
    ),
    (
        "memory-bound three ways",
        [node("a", 1, mem_gb=1.0), node("b", 1, mem_gb=1.0), node("c", 1, mem_gb=1.8)],
        {},
        None,  # checked by properties below: all three needed
    ),
    (
        "a slow node is dropped though it has memory",
        [node("a", 1, mem_gb=2.5), node("b", 1, mem_gb=2.5), node("slow", 50)],
        {},
        None,
    ),
]


@pytest.mark.parametrize(("case", "nodes", "links", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_optimal_table(case: str, nodes: list[NodeSpec], links: dict, expected: list | None) -> None:
    plan = make_plan(model(), nodes, Network(links), FREE)
    if expected is not None:
        assert counts(plan) == expected
    if "three ways" in case:
        assert len(plan.stages) == 3
    if "dropped" in case:
        assert "slow" in plan.unused and "slow" not in dict(counts(plan))


def test_slow_link_keeps_the_pipeline_off_it() -> None:
    # a and b are equally fast and neither holds the model alone; c is a bit slower but sits on a
    # fast link to a, while b is on a slow (Wi-Fi-like) link to everyone.
    slow = Link(rtt_ms=20, bytes_per_s=2e6)
    fast = Link(rtt_ms=0.2, bytes_per_s=1e9)
    links = {("a", "b"): slow, ("b", "c"): slow, ("a", "c"): fast}
    nodes = [node("a", 1, mem_gb=2.0), node("b", 1, mem_gb=2.0), node("c", 1.2, mem_gb=2.0)]
    plan = make_plan(model(), nodes, Network(links), FREE)
    assert sorted(s.node_id for s in plan.stages) == ["a", "c"]
    assert plan.exact


def test_entry_hops_count_the_token_round_trip() -> None:
    # The entry node is slow; the pipeline runs on "fast" and the token crosses the link twice.
    link = Link(rtt_ms=10, bytes_per_s=1e9)
    nodes = [node("entry", 100), node("fast", 1)]
    plan = make_plan(model(), nodes, Network({("entry", "fast"): link}), FREE)
    assert counts(plan) == [("fast", 32)]
    assert plan.predicted_ms_per_token == pytest.approx(32 + 2 + 10 + 2 * 200 / 1e9 * 1e3 * 1, rel=1e-3)


def test_throughput_objective_balances_stages() -> None:
    nodes = [node("a", 1), node("b", 1)]
    latency = make_plan(model(), nodes, budget=FREE)
    throughput = make_plan(model(), nodes, budget=FREE, objective="throughput")
    assert len(latency.stages) == 1  # one hop less is faster for one answer
    assert sorted(n for _, n in counts(throughput)) == [15, 17]  # the last one also runs the head
    assert throughput.throughput_tokens_per_s > latency.throughput_tokens_per_s


def test_does_not_fit_says_how_much_is_missing() -> None:
    nodes = [node("a", 1, mem_gb=1), node("b", 1, mem_gb=1)]
    with pytest.raises(DoesNotFitError) as info:
        make_plan(model(), nodes, budget=Budget(context_tokens=1, headroom=0.1))
    need = model().total_weight_bytes + 32 * 1024
    assert info.value.missing_bytes == need - 2 * int(GB * 0.9)
    assert " missing" in str(info.value)


def test_fits_in_total_but_no_node_holds_the_embedding() -> None:
    nodes = [node(f"n{i}", 1, mem_gb=0.25) for i in range(30)]  # 7.5 GiB, each < embedding + 1 layer
    with pytest.raises(DoesNotFitError, match="embedding or the head"):
        make_plan(model(), nodes, budget=FREE)


def test_kv_cache_for_context_and_sessions_counts_against_memory() -> None:
    nodes = [node("a", 1, mem_gb=4)]
    make_plan(model(), nodes, budget=Budget(context_tokens=1024, sessions=1, headroom=0))
    # 32 layers x 1 KiB/token x 2^17 tokens x 1 session = 4 GiB of KV: no longer fits.
    with pytest.raises(DoesNotFitError):
        make_plan(model(), nodes, budget=Budget(context_tokens=1 << 17, sessions=1, headroom=0))
    # A model of 1024 positions caches no more than that, whatever context was asked for.
    make_plan(dataclasses.replace(model(), max_positions=1024), nodes, budget=Budget(context_tokens=1 << 17, sessions=1, headroom=0))


def test_tied_embeddings_are_held_once_by_a_single_stage() -> None:
    spec = model(tied=True)
    assert stage_memory(spec, FREE, 0, 32) == 32 * (100 * MB + 1024) + 200 * MB
    assert stage_memory(spec, FREE, 0, 16) + stage_memory(spec, FREE, 16, 32) == stage_memory(
        spec, FREE, 0, 32
    ) + 200 * MB


def test_bad_inputs_are_typed_errors() -> None:
    with pytest.raises(PlanError, match="no nodes"):
        make_plan(model(), [])
    with pytest.raises(PlanError, match="share one node id"):
        make_plan(model(), [node("a", 1), node("a", 2)])
    with pytest.raises(PlanError, match="unknown strategy"):
        make_plan(model(), [node("a", 1)], strategy="random")


# -- exactness and properties -------------------------------------------------------------


def brute_force(spec: ModelSpec, nodes: list[NodeSpec], network: Network, budget: Budget, objective: Objective):
    """Every ordered choice of nodes and every split into contiguous ranges."""
    by_id = {n.node_id: n for n in nodes}
    best = None
    for k in range(1, len(nodes) + 1):
        for chosen in itertools.permutations(nodes, k):
            for cuts in itertools.combinations(range(1, spec.num_layers), k - 1):
                bounds = [0, *cuts, spec.num_layers]
                ranges = [(n.node_id, a, b) for n, a, b in zip(chosen, bounds, bounds[1:], strict=False)]
                if any(stage_memory(spec, budget, a, b) > budget.usable(by_id[i].memory_bytes) for i, a, b in ranges):
                    continue
                plan = evaluate(spec, by_id, network, budget, nodes[0].node_id, ranges, strategy="b", objective=objective)
                if best is None or plan.score() < best.score() - 1e-12:
                    best = plan
    return best


@st.composite
def rooms(draw: st.DrawFn, max_nodes: int = 4, max_layers: int = 7):
    layers = draw(st.integers(1, max_layers))
    spec = ModelSpec(
        "m",
        layers,
        layer_bytes=draw(st.integers(1, 10)) * MB,
        embed_bytes=draw(st.integers(0, 20)) * MB,
        head_bytes=draw(st.integers(0, 20)) * MB,
        kv_bytes_per_token=draw(st.integers(0, 4096)),
        hidden_bytes=draw(st.sampled_from([256, 4096, 1 << 20])),
        layer_flops=1,
        tied_embeddings=draw(st.booleans()),
    )
    n = draw(st.integers(1, max_nodes))
    nodes = [
        NodeSpec(
            f"n{i}",
            draw(st.integers(0, 80)) * MB,
            decode_layer_ms=draw(st.floats(0.1, 10)),
            head_ms=draw(st.floats(0, 10)),
            score=draw(st.floats(0.1, 10)),
            stage_ms=draw(st.sampled_from([0.0, 0.5, 3.0])),
        )
        for i in range(n)
    ]
    links = {}
    if draw(st.booleans()):
        for a, b in itertools.combinations(range(n), 2):
            if draw(st.booleans()):
                links[(f"n{a}", f"n{b}")] = Link(draw(st.floats(0, 20)), draw(st.floats(1e5, 1e9)))
    budget = Budget(context_tokens=draw(st.integers(1, 512)), sessions=draw(st.integers(1, 4)), headroom=0.1)
    objective = draw(st.sampled_from(list(Objective)))
    return spec, nodes, Network(links), budget, objective


@settings(max_examples=150, deadline=None)
@given(rooms())
def test_optimal_equals_brute_force(room) -> None:
    spec, nodes, network, budget, objective = room
    best = brute_force(spec, nodes, network, budget, objective)
    if best is None:
        with pytest.raises(DoesNotFitError):
            make_plan(spec, nodes, network, budget, objective=objective)
        return
    plan = make_plan(spec, nodes, network, budget, objective=objective)
    assert plan.score() == pytest.approx(best.score(), rel=1e-9, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(rooms(max_nodes=9, max_layers=40))
def test_plans_are_valid_and_never_worse_than_proportional(room) -> None:
    spec, nodes, network, budget, objective = room
    try:
        plan = make_plan(spec, nodes, network, budget, objective=objective)
    except DoesNotFitError:
        return
    by_id = {n.node_id: n for n in nodes}
    cursor = 0
    for stage in plan.stages:
        assert stage.start == cursor < stage.end  # contiguous, every layer exactly once
        cursor = stage.end
        assert stage.memory_bytes <= budget.usable(by_id[stage.node_id].memory_bytes)
    assert cursor == spec.num_layers
    assert len({s.node_id for s in plan.stages}) == len(plan.stages)
    try:
        proportional = make_plan(spec, nodes, network, budget, objective=objective, strategy="proportional")
    except DoesNotFitError:
        return
    assert plan.score() <= proportional.score() + 1e-9


def test_planning_64_nodes_by_80_layers_takes_under_a_second() -> None:
    spec = model(layers=80, layer_mb=800, embed_mb=2000)
    nodes = [node(f"n{i}", 1 + (i % 7) * 0.5, mem_gb=4 + (i % 5) * 6) for i in range(64)]
    started = time.perf_counter()
    plan = make_plan(spec, nodes, budget=Budget(context_tokens=4096))
    uniform_s = time.perf_counter() - started
    links = {(f"n{i}", f"n{i + 1}"): Link(0.1 + i % 3, 1e8 + i * 1e6) for i in range(63)}
    started = time.perf_counter()
    measured = make_plan(spec, nodes, Network(links), Budget(context_tokens=4096))
    measured_s = time.perf_counter() - started
    assert uniform_s < 1.0 and measured_s < 1.0, (uniform_s, measured_s)
    assert sum(s.layers for s in plan.stages) == 80 == sum(s.layers for s in measured.stages)


# -- nodes that quantize their layers ------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["optimal", "proportional"])
def test_a_model_too_big_in_its_dtype_fits_where_nodes_quantize(strategy: str) -> None:
    """32 layers of 100 MB and two 200 MB ends need 3.6 GB; two 1.5 GB nodes hold it only when
    their layers take half (int8 of a bf16 model) or less."""
    nodes = [node("a", 1.0, mem_gb=1.5), node("b", 1.0, mem_gb=1.5)]
    with pytest.raises(PlanError, match="missing"):
        make_plan(model(), nodes, strategy=strategy, budget=FREE)
    halved = [dataclasses.replace(n, layer_scale=0.5) for n in nodes]
    plan = make_plan(model(), halved, strategy=strategy, budget=FREE)
    assert sum(s.layers for s in plan.stages) == 32
    assert all(s.memory_bytes <= 1.5 * GB for s in plan.stages)
    one = [halved[0], nodes[1]]  # only one quantizes: it takes the larger share
    plan = make_plan(model(), one, strategy=strategy, budget=FREE)
    layers = dict(counts(plan))
    assert layers["a"] > layers["b"]


def test_a_layer_scale_outside_0_to_1_is_refused() -> None:
    with pytest.raises(ValueError, match="layer_scale"):
        dataclasses.replace(node("a", 1.0), layer_scale=0.0)


@pytest.mark.parametrize(("wire", "per_token"), [("native", 4096), ("bf16", 4096), ("auto", 2048 + 64),
                                                 ("int8", 2048 + 64), ("fp8", 2048 + 64)])
def test_hops_cost_the_bytes_of_the_wire_format_each_link_gets(wire: str, per_token: int) -> None:
    hundred_mbit = Link(rtt_ms=1, bytes_per_s=100e6 / 8)
    m = model()  # 4096 bytes a token: 2048 bf16 values
    nodes = {"a": node("a", 1), "b": node("b", 1)}
    ranges = [("a", 0, 16), ("b", 16, 32)]

    def plan(network: Network):  # type: ignore[no-untyped-def]
        return evaluate(m, nodes, network, FREE, "a", ranges, strategy="given")

    native, chosen = plan(Network({("a", "b"): hundred_mbit})), plan(Network({("a", "b"): hundred_mbit}, wire=wire))
    codec_ms = 0.0 if per_token == 4096 else 2048 * 4.0 / 1e6  # quantizing and dequantizing, 4 ns a value
    saved_ms = (4096 - per_token) / hundred_mbit.bytes_per_s * 1e3 - codec_ms
    assert native.predicted_ms_per_token - chosen.predicted_ms_per_token == pytest.approx(saved_ms)
    assert native.predicted_prefill_ms - chosen.predicted_prefill_ms == pytest.approx(128 * saved_ms)
    # A link nobody measured keeps the model's dtype under auto, as the room sends it.
    assert plan(Network(wire="auto")).predicted_ms_per_token == plan(Network()).predicted_ms_per_token
