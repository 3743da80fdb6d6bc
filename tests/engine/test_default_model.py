"""The embedded default model: small, Llama in Hugging Face layout, and it writes English.

The held-out paragraphs below are from Jane Austen's novels (public domain) and were kept out of
training by scripts/train_default_model.py, so the perplexity check measures the model on text it
never saw. austen_words.txt beside this file lists the 3,000 most frequent words of the training
text: common English words and the novels' names, the yardstick for "writes real words".
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.loader import load_stage
from peerpipe.engine.sampling import SamplingParams
from peerpipe.engine.tokenizer import Tokenizer
from peerpipe.models import default_model_dir

MODEL = default_model_dir()
EOS_ID = 1

HELD_OUT = [
    '"You must remember, my dear mother, that I have never considered this matter as certain. I have '
    "had my doubts, I confess; but they are fainter than they were, and they may soon be entirely done "
    'away. If we find they correspond, every fear of mine will be removed."',
    "They now walked on in silence, each of them deep in thought. Elizabeth was not comfortable; that "
    "was impossible; but she was flattered and pleased. His wish of introducing his sister to her was a "
    "compliment of the highest kind. They soon outstripped the others, and when they had reached the "
    "carriage, Mr. and Mrs. Gardiner were half a quarter of a mile behind.",
    '"Come, Fanny, Fanny, what are you about? We are going. Do not you see your aunt is going? Quick, '
    "quick! I cannot bear to keep good old Wilcox waiting. You should always remember the coachman and "
    "horses. My dear Sir Thomas, we have settled it that the carriage should come back for you, and "
    'Edmund and William."',
    "She turned away, and wished he would not say such things. She was willing to allow he might have "
    "more good qualities than she had been wont to suppose. She began to feel the possibility of his "
    "turning out well at last; but he was and must ever be completely unsuited to her, and ought not to "
    "think of her.",
    "To youth and natural cheerfulness like Emma's, though under temporary gloom at night, the return "
    "of day will hardly fail to bring return of spirits. The youth and cheerfulness of morning are in "
    "happy analogy, and of powerful operation; and if the distress be not poignant enough to keep the "
    "eyes unclosed, they will be sure to open to sensations of softened pain and brighter hope.",
]

# Measured 44.7 on these paragraphs; a model guessing uniformly over the vocabulary scores 4096.
MAX_PERPLEXITY = 80.0


def _words(text: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[A-Za-z]+", text)]


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    eng, _ = LocalEngine.from_dir(MODEL, device="cpu", dtype="float32", max_seq=256)
    return eng


def test_folder_is_a_small_llama_in_hf_layout() -> None:
    size = sum(f.stat().st_size for f in MODEL.iterdir() if f.is_file())
    assert size <= 30 * 2**20
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, EOS_ID)
    assert config["tie_word_embeddings"] is True
    index = json.loads((MODEL / "model.safetensors.index.json").read_text())
    assert all((MODEL / f).is_file() for f in set(index["weight_map"].values()))
    assert "model.embed_tokens.weight" in index["weight_map"]
    assert "lm_head.weight" not in index["weight_map"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "LICENSE.md"):
        assert (MODEL / name).is_file(), name


def test_logits_match_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    stage, _ = load_stage(MODEL, device="cpu", dtype=torch.float32)
    ids = torch.tensor([Tokenizer.from_dir(MODEL).encode("It is a truth universally acknowledged.")])
    cache = stage.new_cache(max_slots=1, max_seq=ids.shape[1])
    slot = cache.alloc()
    with torch.inference_mode():
        ours = stage(ids, cache, cache.batch([slot], ids.shape[1]))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4


def test_held_out_perplexity_is_low(engine: LocalEngine) -> None:
    nll, count = 0.0, 0
    for paragraph in HELD_OUT:
        # As in training: a paragraph after BOS, ended by EOS.
        ids = torch.tensor([[*engine.tokenizer.encode(paragraph), EOS_ID]])
        cache = engine.stage.new_cache(max_slots=1, max_seq=ids.shape[1])
        slot = cache.alloc()
        with torch.inference_mode():
            logits = engine.stage(ids, cache, cache.batch([slot], ids.shape[1]))
        nll += F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert math.exp(nll / count) < MAX_PERPLEXITY


def test_sampled_text_is_english_words(engine: LocalEngine) -> None:
    known = set(Path(__file__).with_name("austen_words.txt").read_text().split())
    known |= {w for p in HELD_OUT for w in _words(p)}
    prompt = engine.tokenizer.encode("It was a fine morning, and")
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=60, ignore_eos=True)
    tokens = engine.generate(prompt, params).tokens
    assert len(tokens) == 60
    # Decoded paragraph by paragraph: joined text would glue the words on either side of an EOS.
    pieces: list[list[int]] = [[]]
    for t in tokens:
        pieces.append([]) if t == EOS_ID else pieces[-1].append(t)
    words = [w for piece in pieces for w in _words(engine.tokenizer.decode(piece))]
    assert len(words) >= 30
    unknown = [w for w in words if w not in known]
    assert len(unknown) <= 0.1 * len(words), unknown


def test_chat_template_renders_paragraphs() -> None:
    tok = Tokenizer.from_dir(MODEL)
    messages = [{"role": "user", "content": "How do you do? "}]
    assert tok.apply_chat_template(messages) == "<s>How do you do?</s>"
    ids = tok.apply_chat_template_ids(messages)
    assert ids[0] == 0 and ids.count(0) == 1
    assert ids[-1] == EOS_ID
    assert ids[1:-1] == tok.encode("How do you do?", add_special_tokens=False)


@pytest.mark.parametrize("question", ["What do you think of Mr. Darcy?", "Shall we walk to the village?"])
def test_chat_answer_ends_with_eos(engine: LocalEngine, question: str) -> None:
    prompt = engine.tokenizer.apply_chat_template_ids([{"role": "user", "content": question}])
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1, max_tokens=200)
    result = engine.generate(prompt, params)
    assert result.finish_reason == "stop"
    assert _words(result.text)
