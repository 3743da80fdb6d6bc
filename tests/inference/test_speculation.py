"""Speculation through a room of three stages in one process (real sockets, real stages): answers
end exactly where they would without drafts, and rejected drafts leave no trace in any cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from peerpipe.engine.generate import LocalEngine, encode_prompt
from peerpipe.engine.sampling import SamplingParams
from peerpipe.inference.errors import PromptError
from peerpipe.inference.speculation import SpeculationConfig
from peerpipe.models import default_draft_dir, default_model_dir
from peerpipe.python_api import create_room
from tests.inference.test_pipeline import CODE, LINES, arun, local_tokens
from tests.inference.test_pipeline import room as open_room

PROMPT = [5, 17, 42, 99, 3]


def drafted_room(model: Path, device, draft: Path):
    """The test_pipeline room (three stages, two layers each), its host drafting with ``draft``."""
    return open_room(model, device, members=2, layers_per_node=2, draft=draft)


def test_rejected_drafts_roll_every_stage_back(tiny_model_dir, device, warm_layers) -> None:
    """Another random model drafts: it is mostly wrong, so most steps keep a few drafts and drop
    the rest. Every stage must forget the dropped positions, or later tokens would differ."""
    model = tiny_model_dir("llama")
    wrong = tiny_model_dir("llama", seed=1)
    warm_layers(model)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = local_tokens(model, PROMPT, params)

    async def main() -> None:
        async with drafted_room(model, device, wrong) as r:
            pipeline = r.pipeline
            servers = r.servers()
            assert pipeline is not None and len(pipeline.plan.stages) == 3
            spans: list[tuple[int, list[int]]] = []

            def watch(_: str) -> None:
                task = next(iter(t for t in pipeline.tasks.values() if t.active))
                position = len(PROMPT) + len(task.tokens) - 1
                lengths = [int(s.cache.lengths[s.sessions[task.task_id].slot]) for s in servers if task.task_id in s.sessions]
                spans.append((position, lengths))

            result = await pipeline.generate(PROMPT, params, watch, speculate="draft")
            assert result.tokens == expected
            spec = result.speculation
            assert spec is not None and spec.drafted > 0 and spec.accepted < spec.drafted, spec
            limit = pipeline.speculator.config.max_draft
            for position, lengths in spans:
                assert len(lengths) == 3
                # Each stage holds the answer's positions, and at most one step's drafts more.
                assert all(position <= n <= position + 1 + limit for n in lengths), (position, lengths)

    arun(main())


@pytest.mark.parametrize("mode", ["draft", "ngram", "off"])
def test_a_stop_string_or_the_budget_inside_a_kept_block_ends_the_answer_there(
    mode: str, tiny_model_dir, device, warm_layers
) -> None:
    model = tiny_model_dir("llama")
    warm_layers(model)
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=64)
    full = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    stop = full.text[len(full.text) // 2 :][:2]
    assert stop and stop in full.text
    stopped = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=(stop,))
    expected = engine.generate(PROMPT, stopped)
    assert expected.finish_reason == "stop" and len(expected.tokens) < 30

    async def main() -> None:
        async with drafted_room(model, device, model) as r:  # the model drafts for itself
            pipeline = r.pipeline
            assert pipeline is not None
            result = await pipeline.generate(PROMPT, stopped, speculate=mode)
            assert (result.tokens, result.text, result.finish_reason) == (
                expected.tokens, expected.text, "stop"
            )
            if mode != "off":  # what came after the stop was never the answer's
                spec = result.speculation
                assert spec is not None and spec.tokens == spec.steps + spec.accepted == len(expected.tokens) - 1
            for budget in (1, 2, 7, 9):
                short = SamplingParams(temperature=0.0, max_tokens=budget, ignore_eos=True)
                answer = await pipeline.generate(PROMPT, short, speculate=mode)
                assert answer.tokens == full.tokens[:budget] and answer.finish_reason == "length"
            if mode != "off":  # counted under the mode the answers asked for, not the room's default
                assert pipeline.speculator.totals.accepted > 0
                room = pipeline.speculator.to_json()
                assert list(room["modes"]) == [mode] and room["modes"][mode]["drafted"] == room["drafted"]

    arun(main())


def test_eos_inside_a_kept_block_ends_a_chat_answer_there(device, warm_layers) -> None:
    """The bundled model with its bundled draft: the reply's </s> comes inside a drafted block."""
    model = default_model_dir()
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=256)
    greedy = SamplingParams(temperature=0.0, max_tokens=200)
    prompts = [encode_prompt(engine.tokenizer, p, chat=True) for p in ("Good morning.", "What do you think of Mr. Darcy?")]
    expected = [engine.generate(ids, greedy) for ids in prompts]
    assert all(e.finish_reason == "stop" for e in expected)

    async def main() -> None:
        async with create_room(
            model, code=str(CODE), dtype="float32", measured=device, draft=default_draft_dir(), report=LINES.append
        ) as host:
            await host.plan(60)
            assert host.inference is not None
            # Every step drafts 8: with no links here, the adaptive size would draft less.
            host.inference.speculator.config = SpeculationConfig("draft", 8, adaptive=False)
            for ids, want in zip(prompts, expected, strict=True):
                got = await host.inference.pipeline.generate(ids, greedy)
                assert (got.tokens, got.finish_reason, got.text) == (want.tokens, "stop", want.text)
                assert got.speculation is not None and got.speculation.mode == "draft"
                assert got.speculation.tokens_per_step > 2, got.speculation

    arun(main())


def test_asking_for_a_draft_model_the_room_lacks_is_a_prompt_error(tiny_model_dir, device, warm_layers) -> None:
    model = tiny_model_dir("llama")
    warm_layers(model)

    async def main() -> None:
        async with create_room(model, code=str(CODE), dtype="float32", measured=device, report=LINES.append) as host:
            await host.plan(60)
            with pytest.raises(PromptError, match="no draft model"):
                await host.generate([5, 6, 7], speculate="draft", max_tokens=3)
            assert (await host.generate([5, 6, 7], speculate="ngram", max_tokens=3)).speculation is not None

    arun(main())
