"""Stages of one machine pass hidden states through shared memory (plan wire "local"), not the
encrypted socket: the planner picks it for nodes on one address that share memory, the answers
are the local engine's token for token, and every allocation is read."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from peerpipe.cluster.config import ClusterConfig
from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.sampling import SamplingParams
from peerpipe.inference import wire
from peerpipe.plan import Budget
from peerpipe.python_api import create_room, join_room

PROMPTS = [[5, 17, 42, 99, 3], [7, 7, 8, 100, 200, 1, 2]]


async def room_of(model, device, count: int, wire_choice: str = "auto") -> contextlib.AsyncExitStack:
    config = ClusterConfig(
        expect_nodes=count, strategy="proportional", budget=Budget(128, 4), wire=wire_choice, replan_debounce_s=0.2
    )
    stack = contextlib.AsyncExitStack()
    room = await stack.enter_async_context(create_room(model, dtype="float32", config=config, measured=device, speculate="off"))
    for i in range(count - 1):
        await stack.enter_async_context(join_room(str(room.code), peer=room.address, model=model, name=f"m{i}", measured=device))
    stack.room = room  # type: ignore[attr-defined]
    return stack


def test_three_stages_of_one_machine_use_shared_memory_and_answer_as_one_node(model, device) -> None:
    assert device.shm_gbps > 0
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=128)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [engine.generate(p, greedy).tokens for p in PROMPTS]
    read: list[int] = []
    real = wire._from_shared

    def counting(data, dtype, dev):  # type: ignore[no-untyped-def]
        read.append(len(data.data))
        return real(data, dtype, dev)

    async def main() -> None:
        async with await room_of(model, device, 3) as stack:
            room = stack.room  # type: ignore[attr-defined]
            plan = await room.plan(60)
            assert [s.wire for s in plan.stages] == ["local", "local", "local"]
            infos = {m.info.node_id: m.info for m in room.view().members}
            assert len({i.machine for i in infos.values()}) == 1 and all(i.shm_gbps > 0 for i in infos.values())
            answers = await asyncio.gather(
                *(room.generate(p, temperature=0.0, max_tokens=12, ignore_eos=True) for p in PROMPTS)
            )
            assert [a.tokens for a in answers] == expected

    wire._from_shared = counting
    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        wire._from_shared = real
    # Every hidden state of both hops came through shared memory as a 40-byte reference.
    assert len(read) >= 2 * sum(12 for _ in PROMPTS) and set(read) == {40}


def test_native_keeps_the_socket_and_nodes_on_other_addresses_do_not_share(model, device) -> None:
    async def main() -> None:
        async with await room_of(model, device, 2, "native") as stack:
            plan = await stack.room.plan(60)  # type: ignore[attr-defined]
            assert [s.wire for s in plan.stages] == ["", ""]

    asyncio.run(asyncio.wait_for(main(), 120))
    from peerpipe.cluster.planning import shares_memory

    a = device.node_info("a" * 16, "a", "127.0.0.1:1000")
    assert shares_memory(a, device.node_info("b" * 16, "b", "127.0.0.1:2000"))
    # Two network namespaces of one machine share /dev/shm, but were set up to cross a network.
    assert not shares_memory(a, device.node_info("b" * 16, "b", "10.0.0.2:2000"))
    assert not shares_memory(a, dataclasses.replace(device, shm_gbps=0.0).node_info("b" * 16, "b", "127.0.0.1:2"))


@pytest.mark.parametrize("stages", [2, 1])
def test_tokens_ahead_pass_the_next_step_on_and_answers_stay_the_local_engines(model, device, monkeypatch, stages) -> None:
    """With tokens sent ahead (PEERPIPE_TOKENS_AHEAD=1 lets CPU stages do it), the host passes
    each next step on before the last stage has computed its input: the answers are the local
    engine's, and one that ends on a stop token or its budget ends exactly there."""
    monkeypatch.setenv("PEERPIPE_TOKENS_AHEAD", "1")
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=128)
    whole = engine.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)).text
    # A stop string: the step passed on after the token that completes it is dropped.
    stop = next(whole[i : i + 3] for i in range(len(whole) // 2, len(whole)) if whole[i : i + 3].strip())
    cases = [(PROMPTS[0], {"max_tokens": 12}), (PROMPTS[1], {"max_tokens": 3}), (PROMPTS[0], {"max_tokens": 12, "stop": [stop]})]

    async def main() -> None:
        async with await room_of(model, device, stages) as stack:
            room = stack.room  # type: ignore[attr-defined]
            plan = await room.plan(60)
            assert [s.wire for s in plan.stages] == ["local"] * stages
            passed = room._entry().pipeline._ahead
            for prompt, params in cases:
                before = passed.sent
                answer = await room.generate(prompt, temperature=0.0, ignore_eos=True, **params)
                want = engine.generate(prompt, SamplingParams(temperature=0.0, ignore_eos=True, **params))
                assert (answer.tokens, answer.text, answer.finish_reason) == (want.tokens, want.text, want.finish_reason)
                # Every decode step but the first went ahead; the budget sent none past the last
                # token, a stop string (unknown when its token's result came) one, dropped.
                stopped = want.finish_reason == "stop"
                assert passed.sent - before == len(want.tokens) - 2 + stopped

    asyncio.run(asyncio.wait_for(main(), 120))
