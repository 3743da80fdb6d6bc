"""Tokenizer: ids match transformers on every tiny model; streaming never splits a character."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerpipe.devtools.tiny_model import (
    ARCHITECTURES,
    BOS_ID,
    EOS_ID,
    IM_END_ID,
    IM_START_ID,
    TOKENIZER_VOCAB_SIZE,
    write_tiny_model,
)
from peerpipe.engine.errors import TokenizerError
from peerpipe.engine.tokenizer import Tokenizer

MakeTiny = Callable[..., Path]

TEXTS = [
    "",
    "Hello world",
    " leading space and  double  spaces\n\nnew lines\t tabs",
    "café naïve Grüße 東京 😀 ☕ + 📚",
    "numbers 3.14159 and 1234567890",
    "<|im_start|>user\nhi<|im_end|> inline special <|begin_of_text|>",
    "def add(a, b):\n    return a + b\n",
]


@functools.cache
def _hf(path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_encode_decode_match_transformers(tiny_model_dir: MakeTiny, arch: str) -> None:
    d = tiny_model_dir(arch)
    ours, ref = Tokenizer.from_dir(d), _hf(d)
    assert ours.vocab_size == len(ref) == TOKENIZER_VOCAB_SIZE
    assert ours.bos_id == ref.bos_token_id
    assert ref.eos_token_id in ours.eos_ids
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref(text, add_special_tokens=special)["input_ids"], (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)


@pytest.mark.parametrize(
    ("arch", "bos", "eos"),
    [
        ("llama", BOS_ID, {EOS_ID}),
        ("llama3", BOS_ID, {EOS_ID, IM_END_ID}),
        ("qwen2", None, {IM_END_ID, EOS_ID}),
        ("qwen3", None, {IM_END_ID, EOS_ID}),
        ("mistral", BOS_ID, {EOS_ID}),  # special tokens stored as {"content": ...} dicts
    ],
)
def test_special_ids(tiny_model_dir: MakeTiny, arch: str, bos: int | None, eos: set[int]) -> None:
    tok = Tokenizer.from_dir(tiny_model_dir(arch))
    assert tok.bos_id == bos
    assert tok.eos_ids == frozenset(eos)
    assert (tok.encode("hi")[0] == BOS_ID) == (bos is not None)
    assert BOS_ID not in tok.encode("hi", add_special_tokens=False)
    assert tok.token_to_id("<|im_start|>") == IM_START_ID


def test_eos_ids_from_every_config(tmp_path: Path) -> None:
    d = write_tiny_model(tmp_path / "m", "llama", config_overrides={"eos_token_id": [EOS_ID, 7]})
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert Tokenizer.from_dir(d).eos_ids == {EOS_ID, 7, 9}


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    dec = tok.stream_decoder(skip_special_tokens=skip)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_holds_back_partial_characters(tiny_model_dir: MakeTiny) -> None:
    tok = Tokenizer.from_dir(tiny_model_dir("llama"))
    text = "Emoji 😀 and 東京 and ☕📚 done"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-1] == ""


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.integers(0, TOKENIZER_VOCAB_SIZE - 1), max_size=40),
    skip=st.booleans(),
    chunk=st.integers(1, 4),
)
def test_stream_concatenation_equals_decode(ids: list[int], skip: bool, chunk: int) -> None:
    tok = _stream_tokenizer()
    dec = tok.stream_decoder(skip_special_tokens=skip)
    pieces = [dec.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids, skip)
    assert all(not p.endswith("\ufffd") for p in pieces[:-1])


@functools.lru_cache(maxsize=1)
def _stream_tokenizer() -> Tokenizer:
    # hypothesis forbids function-scoped fixtures in @given tests; build one folder for all runs.
    import tempfile

    return Tokenizer.from_dir(write_tiny_model(Path(tempfile.mkdtemp()) / "m", "qwen2"))


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer.json", "{not json", "could not be loaded"),
        ("tokenizer.json", '{"model": {"type": "Nope"}}', "could not be loaded"),
        ("tokenizer_config.json", "[1, 2", "not valid JSON"),
        ("tokenizer_config.json", "[1, 2]", "JSON object"),
        ("generation_config.json", "{", "not valid JSON"),
    ],
)
def test_corrupt_files(tiny_model_dir: MakeTiny, tmp_path: Path, name: str, content: str, match: str) -> None:
    d = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    (d / name).write_text(content)
    with pytest.raises(TokenizerError, match=match) as info:
        Tokenizer.from_dir(d)
    assert str(d / name) in str(info.value)
