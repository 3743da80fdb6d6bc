"""Answers that start at different times on a room whose stages share one machine's cores fall
into step (inference/rounds.py): after a round or two their decode steps share every forward,
and their tokens stay those of each answer alone."""

from __future__ import annotations

import asyncio

from peerpipe.engine.sampling import SamplingParams
from peerpipe.inference.stage_server import StageServer
from peerpipe.protocol import ComputeRequest
from tests.inference.test_pipeline import arun, device, room  # noqa: F401 (device: a fixture)

TOKENS = 16
PARAMS = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)


def test_answers_started_apart_decode_in_one_forward(tiny_model_dir, device, warm_layers, monkeypatch) -> None:  # noqa: F811
    model = tiny_model_dir("llama")
    warm_layers(model)
    # Prompts of three lengths: each prefills in a forward of its own, so the answers' first
    # decode steps reach the stages at different times.
    prompts = [[5, 17, 42, 99, 3], [7, 7, 8], [100, 200, 30, 40, 50, 60, 11]]
    forwards: dict[str, list[int]] = {}  # each stage's decode forwards, by size
    run = StageServer._run

    async def spy(self: StageServer, requests: list[ComputeRequest]) -> None:
        if requests[0].start_pos > 0 and self._new_positions(requests[0]) == 1:
            forwards.setdefault(self.label, []).append(len(requests))
        await run(self, requests)

    async def main() -> tuple[list[list[int]], list[list[int]], int]:
        async with room(model, device, members=2, layers_per_node=2) as r:
            pipeline = r.pipeline
            assert pipeline is not None and pipeline.rounds is not None
            alone = [(await pipeline.generate(p, PARAMS, speculate="off")).tokens for p in prompts]
            monkeypatch.setattr(StageServer, "_run", spy)
            together = await asyncio.gather(*(pipeline.generate(p, PARAMS, speculate="off") for p in prompts))
            return alone, [t.tokens for t in together], pipeline.rounds.held

    alone, together, held = arun(main())
    assert together == alone
    assert held > 0  # answers waited for each other's steps
    assert forwards
    for label, sizes in forwards.items():
        # Apart, every answer's TOKENS - 1 decode steps would take forwards of their own.
        assert len(sizes) <= TOKENS + 3, (label, sizes)
        assert sizes.count(len(prompts)) >= TOKENS - 4, (label, sizes)
