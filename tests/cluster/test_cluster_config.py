"""A room's configuration is refused when it is made, not when the first member joins."""

from __future__ import annotations

import pytest

from peerpipe.cluster.config import ClusterConfig
from peerpipe.plan import PlanError
from peerpipe.plan.wire import WireChoiceError


@pytest.mark.parametrize(
    ("fields", "error", "why"),
    [
        ({"wire": "int4"}, WireChoiceError, "wire must be one of auto, native"),
        ({"strategy": "fastest"}, PlanError, "unknown strategy 'fastest'"),
        ({"objective": "speed"}, PlanError, "unknown objective 'speed'; choose one of latency"),
        ({"expect_nodes": 0}, PlanError, "expect_nodes must be at least 1"),
        ({"replicas": -1}, PlanError, "replicas at least 0"),
    ],
)
def test_a_bad_field_is_refused_with_the_choices(fields: dict[str, object], error: type[Exception], why: str) -> None:
    with pytest.raises(error, match=why):
        ClusterConfig(**fields)  # type: ignore[arg-type]


def test_every_documented_choice_is_accepted() -> None:
    for wire in ("auto", "native", "bf16", "fp16", "int8", "fp8"):
        assert ClusterConfig(wire=wire).wire == wire
    assert ClusterConfig(strategy="proportional", objective="throughput", expect_nodes=3, replicas=1).replicas == 1
