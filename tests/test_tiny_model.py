"""The tiny model writer: layout, shards, dtypes, determinism, and loading by Hugging Face."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from peerpipe.devtools.tiny_model import (
    ARCHITECTURES,
    BOS_ID,
    EOS_ID,
    IM_END_ID,
    SPECIAL_TOKENS,
    TOKENIZER_VOCAB_SIZE,
    param_count,
    tensor_specs,
    tiny_config,
    write_random_model,
    write_tiny_model,
)

MakeTiny = Callable[..., Path]


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_files_and_tensor_names(tiny_model_dir: MakeTiny, arch: str) -> None:
    d = tiny_model_dir(arch)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (d / name).is_file(), name
    cfg = json.loads((d / "config.json").read_text())
    tensors = _all_tensors(d)
    assert set(tensors) == {s.name for s in tensor_specs(cfg)}
    assert sum(t.numel() for t in tensors.values()) == param_count(cfg)
    assert ("lm_head.weight" in tensors) == (not cfg["tie_word_embeddings"])
    assert cfg["vocab_size"] == TOKENIZER_VOCAB_SIZE
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


def test_arch_specific_shapes(tiny_model_dir: MakeTiny) -> None:
    qwen3 = _all_tensors(tiny_model_dir("qwen3"))
    assert qwen3["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)  # head_dim 32 x 4 heads
    assert qwen3["model.layers.0.self_attn.k_norm.weight"].shape == (32,)
    qwen2 = _all_tensors(tiny_model_dir("qwen2"))
    assert qwen2["model.layers.3.self_attn.v_proj.bias"].shape == (32,)
    assert "model.layers.0.self_attn.o_proj.bias" not in qwen2
    llama3 = json.loads((tiny_model_dir("llama3") / "config.json").read_text())
    assert llama3["rope_scaling"]["rope_type"] == "llama3"
    assert llama3["eos_token_id"] == [EOS_ID, IM_END_ID]


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_shards_hold_distinct_layers_and_same_values(tiny_model_dir: MakeTiny, shards: int) -> None:
    d = tiny_model_dir("llama", shards=shards)
    assert not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    layers_per_file: list[set[int]] = []
    for f in files:
        with safe_open(str(d / f), "pt") as sf:
            keys = set(sf.keys())
        assert keys == {n for n, v in index["weight_map"].items() if v == f}
        layers_per_file.append({int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")})
    assert all(layers_per_file)
    for a in range(shards):
        for b in range(a + 1, shards):
            assert not layers_per_file[a] & layers_per_file[b]
    assert index["weight_map"]["model.embed_tokens.weight"] == files[0]
    assert index["weight_map"]["model.norm.weight"] == files[-1]
    sharded, single = _all_tensors(d), _all_tensors(tiny_model_dir("llama"))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sharded.values())
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_stored(tiny_model_dir: MakeTiny, dtype: str) -> None:
    d = tiny_model_dir("qwen2", dtype=dtype)
    assert {t.dtype for t in _all_tensors(d).values()} == {getattr(torch, dtype)}
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == dtype


def test_seed_determinism(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a", "qwen3", seed=7)
    b = write_tiny_model(tmp_path / "b", "qwen3", seed=7)
    c = write_tiny_model(tmp_path / "c", "qwen3", seed=8)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tokenizer_special_tokens(tiny_model_dir: MakeTiny) -> None:
    vocab = json.loads((tiny_model_dir("llama") / "tokenizer.json").read_text())["added_tokens"]
    assert [(t["id"], t["content"], t["special"]) for t in vocab] == [
        (i, s, True) for i, s in enumerate(SPECIAL_TOKENS)
    ]
    assert SPECIAL_TOKENS[BOS_ID] == "<|begin_of_text|>"


def test_chat_template_locations(tiny_model_dir: MakeTiny) -> None:
    in_config = tiny_model_dir("llama")
    in_file = tiny_model_dir("llama", chat_template_file=True)
    none = tiny_model_dir("llama", chat_template=None)
    tc = json.loads((in_config / "tokenizer_config.json").read_text())
    assert "chat_template" in tc and not (in_config / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((in_file / "tokenizer_config.json").read_text())
    assert (in_file / "chat_template.jinja").read_text() == tc["chat_template"]
    assert "chat_template" not in json.loads((none / "tokenizer_config.json").read_text())
    assert not (none / "chat_template.jinja").exists()


def test_param_count_matches_llama_3_2_1b() -> None:
    cfg = tiny_config(
        "llama3",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    assert param_count(cfg) == 1_235_814_400


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_config("gpt2")
    with pytest.raises(ValueError, match="shards"):
        write_tiny_model(tmp_path / "a", shards=5)
    with pytest.raises(ValueError, match="dtype"):
        write_tiny_model(tmp_path / "b", dtype="int8")
    with pytest.raises(ValueError, match="vocab_size"):
        write_random_model(tmp_path / "c", tiny_config("llama", vocab_size=100))
    with pytest.raises(ValueError, match="model_type"):
        tensor_specs({"model_type": "gpt2"})


def test_random_model_copies_tokenizer(tiny_model_dir: MakeTiny, tmp_path: Path) -> None:
    src = tiny_model_dir("qwen2", chat_template_file=True)
    cfg = tiny_config("qwen2", num_hidden_layers=2, hidden_size=32, num_attention_heads=2)
    d = write_random_model(tmp_path / "m", cfg, shards=2, tokenizer=src)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (d / name).read_bytes() == (src / name).read_bytes()
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == [IM_END_ID, EOS_ID]
    bare = write_random_model(tmp_path / "bare", cfg, tokenizer=None)
    assert not (bare / "tokenizer.json").exists()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_transformers_loads_every_arch(tiny_model_dir: MakeTiny, arch: str) -> None:
    transformers = pytest.importorskip("transformers")
    d = tiny_model_dir(arch, shards=2)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    tok = transformers.AutoTokenizer.from_pretrained(d)
    ids = tok("The lighthouse keeper climbed the stairs")["input_ids"]
    assert (ids[0] == BOS_ID) == (not arch.startswith("qwen"))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    assert logits.shape == (len(ids), TOKENIZER_VOCAB_SIZE)
    # Random but not degenerate: positions disagree and the distribution is not flat.
    assert logits.std() > 0.3
    assert len(set(logits.argmax(-1).tolist())) > 1
