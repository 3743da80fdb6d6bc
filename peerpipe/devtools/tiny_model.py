"""Write small random models in the Hugging Face layout, offline.

Tests, benchmarks and the demo need real model directories (config.json, safetensors,
tokenizer.json, tokenizer_config.json) without downloading anything. The weights are random
but deterministic in ``seed``; each tensor is drawn from its own generator keyed by its name, so
the same seed gives the same weights whatever the number of shards. The tokenizer is a small
byte-level BPE trained on ``corpus.txt`` shipped beside this file.

This module never imports ``transformers``; tests use it as the reference to check against.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from peerpipe.engine.loader import DTYPE_NAMES
from peerpipe.engine.random_weights import mark_random

ARCHITECTURES = ("llama", "llama3", "qwen2", "qwen3", "mistral")

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 3
TOKENIZER_VOCAB_SIZE = 512

# ChatML with an optional leading BOS, the shape most chat models ship.
CHATML_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DTYPES = DTYPE_NAMES

_CORPUS = Path(__file__).with_name("corpus.txt")
_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ARCH_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
TokenizerStyle = Literal["llama", "qwen"]
# The pre-tokenizer split Qwen2/Qwen3 checkpoints declare: digits one by one, letters in runs.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@functools.lru_cache(maxsize=1)
def _trained_bpe_json() -> str:
    # Training takes ~10 ms but tests build many models; the result is deterministic.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    return tok.to_str()


def tiny_tokenizer_json(style: TokenizerStyle = "llama") -> str:
    """The tokenizer.json text. Llama-style prepends BOS in its post-processor; Qwen-style has no BOS."""
    tok = Tokenizer.from_str(_trained_bpe_json())
    if style == "qwen":
        # Qwen's own tokenizer.json pipeline; transformers' Qwen2Tokenizer rebuilds exactly this
        # (ignoring the file's), so anything else would make the tiny model disagree with it.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if style == "llama":
        bos = SPECIAL_TOKENS[BOS_ID]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, BOS_ID)]
        )
    return tok.to_str()


def _style_of(config: dict[str, Any]) -> TokenizerStyle:
    return "qwen" if str(config.get("model_type", "")).startswith("qwen") else "llama"


def tiny_config(arch: str, **overrides: Any) -> dict[str, Any]:
    """A small Hugging Face config.json dict for ``arch`` (one of ``ARCHITECTURES``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")
    model_type = "llama" if arch == "llama3" else arch
    qwen = model_type.startswith("qwen")
    cfg: dict[str, Any] = {
        "architectures": [_ARCH_CLASSES[model_type]],
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "vocab_size": TOKENIZER_VOCAB_SIZE,
        # Qwen models name <|endoftext|> as BOS in config.json and stop on <|im_end|>.
        "bos_token_id": EOS_ID if qwen else BOS_ID,
        "eos_token_id": IM_END_ID if qwen else EOS_ID,
        "tie_word_embeddings": arch in ("llama3", "qwen2", "qwen3"),
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if arch == "llama3":
        cfg["rope_theta"] = 500000.0
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg["eos_token_id"] = [EOS_ID, IM_END_ID]
    if model_type == "mistral":
        cfg["sliding_window"] = None
    if qwen:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=4)
    if model_type == "qwen3":
        cfg.update(head_dim=32, attention_bias=False)
    cfg.update(overrides)
    return cfg


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: Literal["embedding", "matrix", "norm", "bias"]
    layer: int | None  # None for embeddings, final norm and LM head

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor a checkpoint of ``config`` holds, with the exact Hugging Face names."""
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; expected one of {_MODEL_TYPES}")
    h = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or h // n_heads)
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
    o_bias = model_type != "qwen2" and bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))

    specs = [TensorSpec("model.embed_tokens.weight", (vocab, h), "embedding", None)]
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        out = {"q": n_heads * head_dim, "k": n_kv * head_dim, "v": n_kv * head_dim}
        for proj, width in out.items():
            specs.append(TensorSpec(f"{p}self_attn.{proj}_proj.weight", (width, h), "matrix", i))
            if qkv_bias:
                specs.append(TensorSpec(f"{p}self_attn.{proj}_proj.bias", (width,), "bias", i))
        specs.append(TensorSpec(f"{p}self_attn.o_proj.weight", (h, n_heads * head_dim), "matrix", i))
        if o_bias:
            specs.append(TensorSpec(f"{p}self_attn.o_proj.bias", (h,), "bias", i))
        if model_type == "qwen3":
            specs.append(TensorSpec(f"{p}self_attn.q_norm.weight", (head_dim,), "norm", i))
            specs.append(TensorSpec(f"{p}self_attn.k_norm.weight", (head_dim,), "norm", i))
        for proj, shape in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
            specs.append(TensorSpec(f"{p}mlp.{proj}_proj.weight", shape, "matrix", i))
            if mlp_bias:
                specs.append(TensorSpec(f"{p}mlp.{proj}_proj.bias", (shape[0],), "bias", i))
        specs.append(TensorSpec(f"{p}input_layernorm.weight", (h,), "norm", i))
        specs.append(TensorSpec(f"{p}post_attention_layernorm.weight", (h,), "norm", i))
    specs.append(TensorSpec("model.norm.weight", (h,), "norm", None))
    if not config.get("tie_word_embeddings", False):
        specs.append(TensorSpec("lm_head.weight", (vocab, h), "matrix", None))
    return specs


def param_count(config: dict[str, Any]) -> int:
    """Number of stored parameters (a tied LM head counts once)."""
    return sum(s.numel for s in tensor_specs(config))


def _random_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    # Keyed by name so that the same seed gives the same weights for any shard split.
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % (1 << 62))
    noise = torch.randn(spec.shape, generator=g, dtype=torch.float32)
    if spec.kind == "norm":
        t = noise.mul_(0.1).add_(1.0)
    elif spec.kind == "bias":
        t = noise.mul_(0.05)
    else:
        # 1/sqrt(fan_in) keeps activations and logits O(1): peaked enough that greedy decoding
        # is not a coin toss, flat enough that sampling still varies.
        t = noise.mul_(1.0 / math.sqrt(spec.shape[-1]))
    return t.to(dtype)


def _shard_of(spec: TensorSpec, n_layers: int, shards: int, *, last: int) -> int:
    if spec.layer is None:
        return 0 if spec.name == "model.embed_tokens.weight" else last
    return spec.layer * shards // n_layers


def _write_weights(path: Path, config: dict[str, Any], seed: int, dtype: str, shards: int) -> None:
    torch_dtype = DTYPES[dtype]
    specs = tensor_specs(config)
    n_layers = int(config["num_hidden_layers"])
    if not 1 <= shards <= max(1, n_layers):
        raise ValueError(f"shards must be between 1 and num_hidden_layers ({n_layers}), got {shards}")
    if shards == 1:
        save_file(
            {s.name: _random_tensor(s, seed, torch_dtype) for s in specs},
            str(path / "model.safetensors"),
            metadata={"format": "pt"},
        )
        return
    groups: list[list[TensorSpec]] = [[] for _ in range(shards)]
    for s in specs:
        groups[_shard_of(s, n_layers, shards, last=shards - 1)].append(s)
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        # One shard in memory at a time: a 1B-parameter shape stays within a few GB.
        tensors = {s.name: _random_tensor(s, seed, torch_dtype) for s in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({s.name: fname for s in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _added_token(content: str) -> dict[str, Any]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def write_tiny_tokenizer(
    path: Path,
    style: TokenizerStyle = "llama",
    *,
    chat_template: str | None = CHATML_TEMPLATE,
    chat_template_file: bool = False,
    token_dicts: bool = False,
    model_max_length: int = 256,
) -> None:
    """Write tokenizer.json and tokenizer_config.json (and chat_template.jinja if asked)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tiny_tokenizer_json(style), encoding="utf-8")

    def tok(content: str | None) -> Any:
        return _added_token(content) if (token_dicts and content is not None) else content

    llama = style == "llama"
    tcfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok(SPECIAL_TOKENS[BOS_ID]) if llama else None,
        "eos_token": tok(SPECIAL_TOKENS[EOS_ID] if llama else SPECIAL_TOKENS[IM_END_ID]),
        "pad_token": tok(SPECIAL_TOKENS[EOS_ID]),
        # Explicit null as in Qwen's own files; transformers' Qwen2Tokenizer would invent one.
        "unk_token": None,
        "add_bos_token": llama,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if chat_template is not None:
        if chat_template_file:
            (path / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        else:
            tcfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def write_random_model(
    path: Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    dtype: str = "float32",
    shards: int = 1,
    tokenizer: Path | Literal["tiny"] | None = "tiny",
    on_device: bool = False,
) -> Path:
    """Write random weights of any shape plus config.json and generation_config.json.

    ``tokenizer``: ``"tiny"`` writes the built-in tiny BPE (needs ``vocab_size`` >= 512), a
    directory copies the tokenizer files found there, ``None`` writes no tokenizer.
    ``on_device``: write no weights but a random folder (engine/random_weights.py) whose stages
    draw theirs on their device from ``seed``: for shapes no disk holds.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**config, "torch_dtype": dtype}
    if tokenizer == "tiny" and int(config["vocab_size"]) < TOKENIZER_VOCAB_SIZE:
        raise ValueError(f"vocab_size {config['vocab_size']} is smaller than the tiny tokenizer's 512")
    if on_device:
        mark_random(path, seed)
    else:
        _write_weights(path, config, seed, dtype, shards)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    if _style_of(config) == "qwen" and isinstance(gen["eos_token_id"], int):
        # Qwen checkpoints list both end markers in generation_config.json.
        gen["eos_token_id"] = [gen["eos_token_id"], EOS_ID]
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer == "tiny":
        write_tiny_tokenizer(
            path, _style_of(config), model_max_length=int(config.get("max_position_embeddings", 256))
        )
    elif tokenizer is not None:
        for name in _TOKENIZER_FILES:
            src = Path(tokenizer) / name
            if src.is_file():
                shutil.copyfile(src, path / name)
    return path


def write_tiny_model(
    path: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype: str = "float32",
    shards: int = 1,
    config_overrides: dict[str, Any] | None = None,
    chat_template: str | None = CHATML_TEMPLATE,
    chat_template_file: bool = False,
) -> Path:
    """Write a tiny random model of ``arch`` with the tiny tokenizer into ``path``; return ``path``.

    ``chat_template_file`` puts the template in chat_template.jinja instead of tokenizer_config.json.
    Mistral models write their special tokens in the older ``{"content": ...}`` dict form.
    """
    config = tiny_config(arch, **(config_overrides or {}))
    path = write_random_model(Path(path), config, seed=seed, dtype=dtype, shards=shards, tokenizer=None)
    write_tiny_tokenizer(
        path,
        _style_of(config),
        chat_template=chat_template,
        chat_template_file=chat_template_file,
        token_dicts=arch == "mistral",
        model_max_length=int(config["max_position_embeddings"]),
    )
    return path
