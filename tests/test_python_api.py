"""The Python API in the seed's order: create a room, nodes join, plan, generate."""

from __future__ import annotations

import asyncio

import aiohttp

from peerpipe import create_room, join_room
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.engine.generate import LocalEngine
from peerpipe.plan import Budget, stage_memory


def test_create_join_plan_generate(tiny_model_dir, warm_layers) -> None:
    model = tiny_model_dir("llama")
    warm_layers(model)
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=64)
    from peerpipe.engine.sampling import SamplingParams

    expected = engine.generate([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)).tokens
    spec = ModelChoice.from_dir(model, "float32").spec
    memory_gb = stage_memory(spec, Budget(64, 4), 0, 2) / 0.9 / 1e9 + 1e-9

    async def main() -> None:
        kw = {"device": "cpu", "memory_gb": memory_gb}
        async with create_room(model, dtype="float32", context=64, expect_nodes=3, **kw) as room:
            peer = room.address
            async with join_room(str(room.code), peer=peer, model=model, **kw), join_room(
                str(room.code), peer=peer, model=model, **kw
            ):
                await room.wait_for_nodes(3)
                plan = await room.plan()
                assert len(plan.stages) == 3 and plan.stages[-1].end == 4
                result = await room.generate([5, 6, 7], temperature=0.0, max_tokens=8, ignore_eos=True)
                assert result.tokens == expected
                assert {m.info.node_id for m in room.view().members} >= {s.node_id for s in plan.stages}
                api = await room.serve_http(("127.0.0.1", 0))
                try:
                    body = {"model": model.name, "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
                    async with aiohttp.ClientSession() as http, http.post(f"{api.url}/v1/completions", json=body) as r:
                        reply = await r.json()
                    assert reply["choices"][0]["text"] == engine.tokenizer.decode(expected)
                finally:
                    await api.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_room_that_cannot_plan_says_why_at_once_when_asked(tiny_model_dir, warm_layers) -> None:
    """``plan(fail_fast=True)``, as the demo uses it: no two-minute wait for a plan that cannot
    come, and the planner's reason instead of "no plan yet"."""
    import time

    import pytest

    from peerpipe.inference.errors import NotReadyError

    model = tiny_model_dir("llama")
    warm_layers(model)

    async def main() -> None:
        async with create_room(model, dtype="float32", context=64, device="cpu", memory_gb=1e-6) as room:
            began = time.monotonic()
            with pytest.raises(NotReadyError, match=r"cannot plan .*missing"):
                await room.plan(timeout_s=60, fail_fast=True)
            assert time.monotonic() - began < 30

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_bundled_model_by_name() -> None:
    """``austen`` works wherever a model is taken; a folder of that name here would win."""
    import pytest

    from peerpipe.models import ModelNotFoundError, default_model_dir, resolve_model

    assert resolve_model("austen") == default_model_dir()
    with pytest.raises(ModelNotFoundError, match="'austen' for the bundled model"):
        resolve_model("llama")

    async def main() -> None:
        async with create_room("austen", dtype="float32", context=64, device="cpu", quick=True) as room:
            plan = await room.plan(timeout_s=60, fail_fast=True)
            assert plan.model_id == "austen"
            result = await room.generate("It was", max_tokens=4, ignore_eos=True)
            assert len(result.tokens) == 4

    asyncio.run(asyncio.wait_for(main(), 90))
