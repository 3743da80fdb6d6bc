"""Model configuration read from a Hugging Face ``config.json``.

One dataclass covers the Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3): they differ only
in a few switches (q/k/v biases, q/k RMSNorm, RoPE scaling, sliding windows), so the model code
reads switches, never architecture names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peerpipe.engine.errors import ModelLoadError, UnsupportedModelError
from peerpipe.engine.rope import RopeConfig, rope_from_hf

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_positions: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: the sliding-window width, or None for full attention.
    windows: tuple[int | None, ...] = ()
    dtype: str = "float32"  # the checkpoint's own dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(
                    f"config value {name} must be positive, got {getattr(self, name)}"
                )
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads "
                f"({self.n_kv_heads})"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be a positive even number, got {self.head_dim}")
        if len(self.windows) != self.n_layers:
            object.__setattr__(self, "windows", (None,) * self.n_layers)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def shape_key(self) -> str:
        """A short name for what decides a layer's speed: same key, same timing."""
        parts = (
            self.architecture,
            self.hidden_size,
            self.intermediate_size,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.qkv_bias,
            self.o_bias,
            self.mlp_bias,
            self.qk_norm,
        )
        digest = hashlib.sha1(repr(parts).encode()).hexdigest()[:8]
        return f"h{self.hidden_size}-i{self.intermediate_size}-a{self.n_heads}x{self.head_dim}-kv{self.n_kv_heads}-{digest}"

    def layer_param_count(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        norms = 2 * h + 2 * self.head_dim * self.qk_norm
        return attn + mlp + norms

    def param_count(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else embed
        return embed + head + self.hidden_size + self.n_layers * self.layer_param_count()

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return 2 * self.n_layers * self.kv_size * itemsize

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """From a Hugging Face folder's config.json, or from a GGUF file's metadata."""
        path = Path(path)
        if path.is_file():
            from peerpipe.engine.gguf_file import is_gguf, open_gguf

            if not is_gguf(path):
                raise ModelLoadError(f"{path} is a file but not a GGUF model: give a model folder or a .gguf file")
            return cls.from_hf(open_gguf(str(path)).hf_config)
        if not path.is_dir():
            raise ModelLoadError(f"model folder not found: {path}")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"{path} has no config.json: is it a Hugging Face model folder?")
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {cfg_file}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{cfg_file} does not hold a JSON object")
        gen = path / "generation_config.json"
        gen_raw: dict[str, Any] = {}
        if gen.is_file():
            try:
                loaded = json.loads(gen.read_text(encoding="utf-8"))
                gen_raw = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                gen_raw = {}
        return cls.from_hf(raw, gen_raw)

    @classmethod
    def from_hf(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            named = ", ".join(map(str, archs)) or f"model_type {raw.get('model_type')!r}"
            raise UnsupportedModelError(
                f"unsupported architecture {named}; peerpipe runs: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            return cls._from_hf(arch, raw, generation or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json is missing or has a bad value: {exc}") from exc

    @classmethod
    def _from_hf(cls, arch: str, raw: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
        hidden = int(raw["hidden_size"])
        n_heads = int(raw["num_attention_heads"])
        n_kv = int(raw.get("num_key_value_heads") or n_heads)
        head_dim = raw.get("head_dim") or hidden // n_heads
        n_layers = int(raw["num_hidden_layers"])
        qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(raw.get("attention_bias", False))
        eos = generation.get("eos_token_id", raw.get("eos_token_id"))
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"activation {act!r} is not supported; peerpipe runs silu MLPs")
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=rope_from_hf(raw),
            max_positions=int(raw.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            windows=_windows_from_hf(arch, raw, n_layers),
            dtype=_dtype_from_hf(raw),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_ids(eos),
        )


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _dtype_from_hf(raw: dict[str, Any]) -> str:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    aliases = {
        "float": "float32",
        "half": "float16",
        "bf16": "bfloat16",
        "fp16": "float16",
        "fp32": "float32",
    }
    name = aliases.get(str(name), str(name))
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def _windows_from_hf(arch: str, raw: dict[str, Any], n_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if arch == "MistralForCausalLM" and not layer_types:
        return (int(window) if window else None,) * n_layers
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not raw.get("use_sliding_window", False):
        return (None,) * n_layers
    if not layer_types or not window:
        return (None,) * n_layers
    if len(layer_types) != n_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
