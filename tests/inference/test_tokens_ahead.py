"""Tokens ahead in a room (docs/inference.md, "Tokens ahead"): a last stage that fails after its
token went ahead fails the answer with its reason at once."""

from __future__ import annotations

import time

import pytest

from peerpipe.inference.errors import TaskFailedError
from tests.inference.test_pipeline import GREEDY, PROMPTS, arun, local_tokens, room


def test_a_last_stage_failing_after_its_token_went_ahead_fails_the_task_with_its_reason(
    tiny_model_dir, device, warm_layers, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """With tokens sent ahead (docs/inference.md, "Tokens ahead"), the host has passed the next
    step on before the last stage computes: a forward that then fails gives the token up at once,
    and the answer fails with the stage's reason, not after a stall and replays."""
    monkeypatch.setenv("PEERPIPE_TOKENS_AHEAD", "1")
    model = tiny_model_dir("llama")
    warm_layers(model)

    async def main() -> None:
        async with room(model, device, members=2, layers_per_node=2) as r:
            pipeline = r.pipeline
            assert pipeline is not None and pipeline.plan is not None and pipeline.plan.stages[-1].wire == "local"
            server = next(s for s in r.servers() if s.next_hop is None)
            steps = 0

            def broken(module, args):  # the fifth forward (the fourth decode step) raises
                nonlocal steps
                steps += 1
                if steps == 5:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")

            hook = server.stage.register_forward_pre_hook(broken)
            began = time.monotonic()
            with pytest.raises(TaskFailedError, match=r"layers \[\d+, \d+\): RuntimeError: CUDA error"):
                await pipeline.generate(PROMPTS[0], GREEDY, speculate="off")
            assert pipeline._ahead.sent == 4  # (steps 3 to 6 went ahead; step 5's failed)
            assert time.monotonic() - began < 5 and pipeline.recovery.failovers == 0
            hook.remove()
            before = pipeline._ahead.sent
            answer = await pipeline.generate(PROMPTS[0], GREEDY, speculate="off")
            assert answer.tokens == local_tokens(model, PROMPTS[0], GREEDY)
            assert pipeline._ahead.sent - before == GREEDY.max_tokens - 2

    arun(main())
