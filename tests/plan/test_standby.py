"""Standby placement and promotion: pure functions, table tests."""

from __future__ import annotations

import pytest

from peerpipe.plan import Budget, ModelSpec, stage_memory
from peerpipe.plan.standby import place_standbys, promote, uncovered

MODEL = ModelSpec(
    model_id="m", num_layers=8, layer_bytes=100, embed_bytes=50, head_bytes=50, kv_bytes_per_token=1,
    hidden_bytes=8, layer_flops=1000
)
BUDGET = Budget(context_tokens=10, sessions=1, headroom=0.0)
STAGES = [("a", 0, 3), ("b", 3, 6), ("c", 6, 8)]


def memory_for(**extra: int) -> dict[str, int]:
    """Each node offers its own stage plus ``extra`` bytes."""
    own = {n: stage_memory(MODEL, BUDGET, s, e) for n, s, e in STAGES}
    return {n: own.get(n, 0) + extra.get(n, 0) for n in {*own, *extra}}


def test_every_stage_gets_a_standby_on_another_node_when_memory_allows() -> None:
    spares = place_standbys(MODEL, BUDGET, memory_for(a=1000, b=1000, c=1000), STAGES, replicas=1)
    assert {(s, e) for _, s, e in spares} == {(s, e) for _, s, e in STAGES}
    owner = {(s, e): n for n, s, e in STAGES}
    assert all(owner[(s, e)] != n for n, s, e in spares)
    assert uncovered(STAGES, spares) == []


def test_no_spare_memory_no_standby_and_the_gap_is_named() -> None:
    spares = place_standbys(MODEL, BUDGET, memory_for(), STAGES, replicas=1)
    assert spares == ()
    assert uncovered(STAGES, spares) == STAGES


def test_a_node_outside_the_plan_can_hold_standbys_and_memory_is_not_spent_twice() -> None:
    one_range = stage_memory(MODEL, BUDGET, 0, 3)
    spares = place_standbys(MODEL, BUDGET, memory_for(d=one_range), STAGES, replicas=1)
    assert spares == (("d", 0, 3),)  # the largest range first; then d is full


def test_zero_replicas_place_nothing() -> None:
    assert place_standbys(MODEL, BUDGET, memory_for(a=1000, b=1000, c=1000), STAGES, replicas=0) == ()


@pytest.mark.parametrize(
    ("standbys", "lost", "stages_after", "left"),
    [
        ([("c", 3, 6)], {"b"}, [("a", 0, 3), ("c", 3, 6), ("c", 6, 8)], []),
        # c held a stage and b's copy: its stage goes to a; b's copy is gone with it.
        ([("c", 3, 6), ("a", 6, 8)], {"c"}, [("a", 0, 3), ("b", 3, 6), ("a", 6, 8)], []),
        ([("c", 3, 6), ("a", 6, 8)], {"b", "c"}, None, None),  # two losses: b's only copy was on c
        ([("b", 0, 3), ("a", 6, 8)], {"c"}, [("a", 0, 3), ("b", 3, 6), ("a", 6, 8)], [("b", 0, 3)]),
        ([("d", 0, 3)], {"d"}, STAGES, []),  # losing a standby changes no stage
        ([], {"a"}, None, None),
    ],
)
def test_promotion_table(standbys, lost, stages_after, left) -> None:
    result = promote(STAGES, standbys, lost)
    if stages_after is None:
        assert result is None
    else:
        assert result == (tuple(stages_after), tuple(left))
