"""``--quantize auto``: the planner holds a node's layers in full precision when the model fits
so, else in int8, else in int4, and the plan tells the node."""

from __future__ import annotations

import pytest

from peerpipe.cluster.planning import RoomFacts, plan_quantizing, to_protocol
from peerpipe.plan import Budget, DoesNotFitError, ModelSpec, stage_memory
from peerpipe.protocol import MemberState, NodeInfo

SPEC = ModelSpec(
    model_id="m", num_layers=8, layer_bytes=10_000_000, embed_bytes=1000, head_bytes=1000, kv_bytes_per_token=16,
    hidden_bytes=64, layer_flops=1000, dtype_bytes=2,
)
BUDGET = Budget(context_tokens=64, sessions=1, headroom=0.0)


def member(name: str, layers: float, quantize: str) -> MemberState:
    memory = int(stage_memory(SPEC, BUDGET, 0, 1) * layers)
    return MemberState(NodeInfo(name, name, "cpu", memory, 1.0, quantize=quantize), "alive")


@pytest.mark.parametrize(
    ("room_layers", "want"),
    [
        ((5, 5), "none"),  # 10 layers of room for 8: nobody quantizes
        ((4, 2.5), "int8"),  # 6.5 in bf16; the auto node's 2.5 hold 5 in int8: 9
        ((4, 1.2), "int4"),  # int8 gives it 2 (6 in all); int4 about 4 (8)
    ],
)
def test_an_auto_node_quantizes_only_as_much_as_the_model_needs(room_layers, want) -> None:  # type: ignore[no-untyped-def]
    fixed, auto = room_layers
    facts = RoomFacts([member("host", fixed, "none"), member("lap", auto, "auto")])
    result, modes = plan_quantizing(SPEC, "", facts, entry="host", half=True, budget=BUDGET, strategy="optimal")
    assert modes == {"lap": want}
    plan = to_protocol(result, 1, SPEC, quantize=modes)
    told = {s.node_id: s.quantize for s in plan.stages}
    assert told.get("host", "") == "" and told.get("lap", want) == want


@pytest.mark.parametrize(
    ("small", "big", "want"),
    [
        (2.5, 3.2, {"small": "int8", "big": "none"}),  # 7 layers in bf16; the small node's int8 gives 9
        (1.5, 3.2, {"small": "int8", "big": "int8"}),  # the small one alone reaches 6: both, 9
        (1.2, 2.2, {"small": "int4", "big": "int8"}),  # both in int8 hold 7; the small one in int4 then
    ],
)
def test_auto_nodes_quantize_one_at_a_time_the_smallest_first(small, big, want) -> None:  # type: ignore[no-untyped-def]
    host = 1 if small < 2 else 2
    # Listed biggest first: the order of the room's members must not decide who quantizes.
    facts = RoomFacts([member("host", host, "none"), member("big", big, "auto"), member("small", small, "auto")])
    result, modes = plan_quantizing(SPEC, "", facts, entry="host", half=True, budget=BUDGET, strategy="optimal")
    assert modes == want
    plan = to_protocol(result, 1, SPEC, quantize=modes)
    assert {s.node_id: s.quantize for s in plan.stages if s.node_id != "host"} == want
    assert sum(s.end - s.start for s in plan.stages) == SPEC.num_layers


def test_a_node_that_said_none_is_never_quantized_and_the_room_says_what_is_missing() -> None:
    facts = RoomFacts([member("host", 4, "none"), member("lap", 1.2, "none")])
    with pytest.raises(DoesNotFitError):
        plan_quantizing(SPEC, "", facts, entry="host", half=True, budget=BUDGET, strategy="optimal")


def test_a_room_whose_laptop_must_quantize_tells_it_to_and_answers(warm_bench) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import contextlib
    import dataclasses

    from peerpipe.cluster.config import ClusterConfig
    from peerpipe.cluster.local import LocalDevice
    from peerpipe.cluster.model_choice import ModelChoice
    from peerpipe.engine.generate import LocalEngine
    from peerpipe.engine.sampling import SamplingParams
    from peerpipe.models import default_model_dir
    from peerpipe.python_api import create_room, join_room

    model = default_model_dir()
    spec = ModelChoice.from_dir(model, "float32").spec
    budget = Budget(context_tokens=128, sessions=2)
    host_memory = stage_memory(spec, budget, 0, 3) / 0.9  # three float32 layers and the embedding
    lap_memory = stage_memory(spec, budget, 5, 6) * 1.5 / 0.9  # one and a half, with the head
    device = asyncio.run(LocalDevice.measure("cpu", quick=True))
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=128)
    prompt = [5, 17, 42, 99, 3, 250, 11]
    want = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)).tokens
    lines: list[str] = []

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            config = ClusterConfig(expect_nodes=2, budget=budget, replan_debounce_s=0.2)
            room = await stack.enter_async_context(create_room(
                model, dtype="float32", config=config, speculate="off", report=lines.append,
                measured=dataclasses.replace(device, memory_limit_bytes=int(host_memory)),
            ))
            lap = await stack.enter_async_context(join_room(
                str(room.code), peer=room.address, name="lap", quantize="auto",
                measured=dataclasses.replace(device, memory_limit_bytes=int(lap_memory)),
            ))
            plan = await room.plan(60)
            told = {s.node_id: s.quantize for s in plan.stages}
            assert told.pop(lap.stage.node_id) == "int8" and set(told.values()) <= {""}  # the host: as it said
            result = await room.generate(prompt, temperature=0.0, max_tokens=8, ignore_eos=True)
            assert result.tokens[:3] == want[:3]  # int8 weights may flip a later near-tie

    asyncio.run(asyncio.wait_for(main(), 120))
    assert any("lap[" in line and "(int8)" in line for line in lines), lines
