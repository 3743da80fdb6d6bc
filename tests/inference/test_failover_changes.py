"""Changes to a room that do not concern an answer leave it alone; members that cannot serve are
planned around; clients see no error across a failover."""

from __future__ import annotations

import json

import aiohttp
import pytest

from peerpipe.engine.generate import LocalEngine
from tests.inference.failover_room import CONTEXT, GREEDY, PROMPT, arun, failover_room, local_tokens


def test_a_member_with_no_layers_leaving_disturbs_nothing(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        # The optimal planner keeps hops few: every layer fits on two nodes, so two stay idle.
        async with failover_room(model, device, members=3, strategy="optimal", lines=lines) as f:
            idle = sorted(set(f.members) - set(f.stage_names()))
            assert idle, f.stage_names()
            before = f.pipeline.plan
            task = await f.answer_after(5, GREEDY)
            f.members[idle[0]].proc.kill()
            result = await task
            assert result.tokens == expected
            assert f.pipeline.recovery.failovers == 0
            assert f.pipeline.plan is not None and before is not None
            assert f.pipeline.plan.version > before.version  # planned again, the same stages

    lines: list[str] = []
    arun(main(lines), lines)


@pytest.mark.slow
def test_a_member_joining_mid_answer_is_planned_in_and_the_answer_goes_on(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=2, lines=lines) as f:
            task = await f.answer_after(3, GREEDY)
            f.start_member("m9")
            await f.room.cluster.wait_until(lambda h: any(m.info.name == "m9" for m in h.view.alive()), 30)
            result = await task
            assert result.tokens == expected

            def planned_in(h) -> bool:  # type: ignore[no-untyped-def]
                plan = h.rollout.plan
                return plan is not None and "m9" in {h.names().get(s.node_id) for s in plan.stages}

            await f.room.cluster.wait_until(planned_in, 30)  # the proportional planner gives every node layers
            await f.room.plan(60)
            assert "m9" in f.stage_names()

    lines: list[str] = []
    arun(main(lines), lines)


def test_a_member_with_another_model_fetches_the_rooms_and_serves_it(model, device, tiny_model_dir) -> None:
    # A complete model, but not the room's: the member fetches the room's layers from its peers.
    other = tiny_model_dir("llama", config_overrides={"num_hidden_layers": 3})
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3, member_model={1: str(other)}, lines=lines) as f:
            assert "m1" in f.stage_names()
            result = await f.room.generate(PROMPT, temperature=0.0, max_tokens=40, ignore_eos=True)
            assert result.tokens == expected

    lines: list[str] = []
    arun(main(lines), lines)
    assert any("m1 fetch" in line for line in lines) or not any("m1 could not" in line for line in lines), lines


@pytest.mark.slow
def test_a_streaming_api_client_sees_no_error_across_a_failover(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3, lines=lines) as f:
            api = await f.room.serve_http(("127.0.0.1", 0))
            try:
                body = {"model": model.name, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                        "stream": True}
                events: list[str] = []
                async with aiohttp.ClientSession() as http, http.post(f"{api.url}/v1/completions", json=body) as response:
                    assert response.status == 200
                    async for raw in response.content:
                        line = raw.decode().strip()
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) == 6:
                                f.members[f.stage_names()[-1]].proc.kill()
            finally:
                await api.close()
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert not any("error" in c for c in chunks)
            text = "".join(c["choices"][0]["text"] for c in chunks)
            engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=CONTEXT)
            assert text == engine.tokenizer.decode(expected)
            assert f.pipeline.recovery.failovers == 1

    lines: list[str] = []
    arun(main(lines), lines)
