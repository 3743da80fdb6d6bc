"""Stages on a GPU: graph-captured decode steps in a room give the local engine's tokens.

Skipped where no CUDA GPU exists (CI); run on the device machine with
``python -m pytest tests/inference/test_cuda_stages.py``.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from peerpipe.cluster.config import ClusterConfig
from peerpipe.engine.cuda_graphs import bucket_for
from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.sampling import SamplingParams
from peerpipe.inference.speculation import SpeculationConfig
from peerpipe.plan import Budget
from peerpipe.python_api import create_room, join_room

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [[5, 17, 42, 99, 3], [7, 7, 8], [100, 200, 30, 40, 50, 60, 11]]


@pytest.mark.parametrize("stages", [1, 2])
def test_a_gpu_room_gives_the_local_engines_tokens(tiny_model_dir, stages: int) -> None:
    model = tiny_model_dir("llama3", seed=3, config_overrides={"num_hidden_layers": 6})
    engine, _ = LocalEngine.from_dir(model, device="cuda", dtype="float32", max_seq=128)
    greedy = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)  # crosses a KV bucket
    expected = [engine.generate(p, greedy).tokens for p in PROMPTS]
    del engine

    async def main() -> None:
        config = ClusterConfig(expect_nodes=stages, strategy="proportional", budget=Budget(128, 4), replan_debounce_s=0.2)
        async with contextlib.AsyncExitStack() as stack:
            room = await stack.enter_async_context(
                create_room(model, device="cuda", dtype="float32", config=config, quick=True, draft=model)
            )
            for i in range(stages - 1):
                await stack.enter_async_context(
                    join_room(str(room.code), peer=room.address, model=model, name=f"m{i}", device="cuda", quick=True)
                )
            plan = await room.plan(120)
            assert len(plan.stages) == stages
            assert room.cluster.stage is not None
            server = room.cluster.stage.server  # type: ignore[attr-defined]
            assert server is not None and server.graphed
            # Captured before serving: for every KV bucket, slot 0's graph and batch sizes 1, 2, 4.
            warmed = dict(server._graphed._graphs)
            buckets = {bucket_for(n, server.cache.max_seq) for n in range(1, server.cache.max_seq + 1)}
            assert server.cache.max_slots == 4, server.cache.max_slots
            assert sorted(warmed, key=str) == sorted(
                [((0,), b, 1) for b in buckets] + [(n, b, 1) for b in buckets for n in (1, 2, 4)], key=str
            )
            fields = {"temperature": 0.0, "max_tokens": 80, "ignore_eos": True}
            alone = [(await room.generate(p, **fields)).tokens for p in PROMPTS]
            together = await asyncio.gather(*(room.generate(p, **fields) for p in PROMPTS))
            assert alone == expected and [t.tokens for t in together] == expected
            # Nothing captured while serving, but the widths of drafted steps (the room drafts).
            assert {k for k in server._graphed._graphs if k[2] == 1} == warmed.keys()
            # The model drafting for itself on the GPU, every step 7 drafts through graphed steps.
            assert room.inference is not None
            room.inference.speculator.config = SpeculationConfig("draft", 7, adaptive=False)
            drafted = [await room.generate(p, speculate="draft", **fields) for p in PROMPTS]
            assert [d.tokens for d in drafted] == expected
            assert all(d.speculation is not None and d.speculation.tokens_per_step > 4 for d in drafted)

    asyncio.run(asyncio.wait_for(main(), 300))
