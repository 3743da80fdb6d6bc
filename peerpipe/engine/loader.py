"""Load one stage (a layer range) of a Hugging Face checkpoint, reading only its own tensors."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peerpipe.dtypes import WEIGHT_DTYPES
from peerpipe.engine.config import ModelConfig
from peerpipe.engine.errors import DeviceError, ModelLoadError, UnsupportedModelError
from peerpipe.engine.model import Stage, interleave_rope_dims
from peerpipe.engine.random_weights import is_random, random_seed, random_stage
from peerpipe.engine.safetensors_io import TensorEntry, read_header, read_tensors

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)

DTYPE_NAMES = {name: getattr(torch, name) for name in WEIGHT_DTYPES}


@dataclass(frozen=True)
class LoadStats:
    bytes_read: int
    checkpoint_bytes: int  # all tensor bytes of the checkpoint, for comparison
    n_tensors: int
    seconds: float


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but this PyTorch sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' asked for, but this PyTorch sees no Apple GPU")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str | torch.dtype | None, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name is not None:
        if name not in DTYPE_NAMES:
            raise ModelLoadError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[name]
    # CPUs run float32 fastest and exactly; accelerators want half precision.
    if device.type == "cpu":
        return torch.float32
    if device.type == "mps":
        return torch.float16
    return DTYPE_NAMES[cfg.dtype] if cfg.dtype != "float32" else torch.bfloat16


def checkpoint_index(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint by name, from the headers alone."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index_file} is not a valid safetensors index: {exc}") from exc
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = " (found PyTorch pickle weights: convert them to safetensors)" if other else ""
        raise ModelLoadError(f"{path} holds no model.safetensors or model.safetensors.index.json{hint}")
    entries: dict[str, TensorEntry] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise ModelLoadError(f"the index names {name}, which is missing from {path}")
        entries.update(read_header(file))
    return entries


def check_model_dir(path: str | Path) -> ModelConfig:
    """Every check a model folder can pass without reading weights: its config, every shard's
    header against the file's real size (a truncated or missing shard fails here), each tensor
    the whole model needs with the shape the config implies, and the tokenizer. A command runs it
    before announcing anything, so a bad folder is one clear line at once, not a stage that never
    loads."""
    from peerpipe.engine.tokenizer import Tokenizer  # the tokenizers library: only when checking

    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    if is_random(path):
        random_seed(path)
    else:
        shapes = _shapes(path)
        check_checkpoint(cfg, shapes, str(path))
        if path.is_file():  # a GGUF: a type no stage loads fails here, not after a room's code is out
            from peerpipe.engine.gguf_file import open_gguf

            open_gguf(str(path)).check_types(stage_tensor_names(cfg, 0, cfg.n_layers, set(shapes)))
    Tokenizer.from_dir(path)
    return cfg


def check_checkpoint(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Every tensor the whole model needs is among ``shapes``, with the shape the config implies."""
    wanted = stage_tensor_names(cfg, 0, cfg.n_layers, set(shapes))
    missing = sorted(n for n in wanted if n not in shapes)
    if missing:
        raise ModelLoadError(f"{where}: the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    _check_shapes(cfg, {n: shapes[n] for n in wanted})


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape by Hugging Face name, from safetensors headers or a GGUF's index."""
    if path.is_file():
        from peerpipe.engine.gguf_file import open_gguf

        model = open_gguf(str(path))
        return {name: model.shape(name) for name in model.tensors}
    return {name: e.shape for name, e in checkpoint_index(path).items()}


def stage_tensor_names(cfg: ModelConfig, start: int, end: int, available: set[str]) -> dict[str, str]:
    """HF tensor name -> role, for the tensors a stage needs."""
    names: dict[str, str] = {}
    for i in range(start, end):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v"):
            names[f"{p}self_attn.{proj}_proj.weight"] = ""
            if cfg.qkv_bias:
                names[f"{p}self_attn.{proj}_proj.bias"] = ""
        names[f"{p}self_attn.o_proj.weight"] = ""
        if cfg.o_bias:
            names[f"{p}self_attn.o_proj.bias"] = ""
        if cfg.qk_norm:
            names[f"{p}self_attn.q_norm.weight"] = ""
            names[f"{p}self_attn.k_norm.weight"] = ""
        for proj in ("gate", "up", "down"):
            names[f"{p}mlp.{proj}_proj.weight"] = ""
            if cfg.mlp_bias:
                names[f"{p}mlp.{proj}_proj.bias"] = ""
        names[f"{p}input_layernorm.weight"] = ""
        names[f"{p}post_attention_layernorm.weight"] = ""
    if start == 0:
        names["model.embed_tokens.weight"] = "embed"
    if end == cfg.n_layers:
        names["model.norm.weight"] = ""
        if cfg.tie_embeddings or "lm_head.weight" not in available:
            names["model.embed_tokens.weight"] = "embed+head" if start == 0 else "head"
        else:
            names["lm_head.weight"] = "head"
    return names


def _stage_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig, start: int, end: int) -> dict:
    """Rename HF tensors to the stage's names, fusing q/k/v and gate/up."""
    sd: dict[str, torch.Tensor] = {}
    for i in range(start, end):
        p, j = f"model.layers.{i}.", f"layers.{i - start}."
        sd[j + "attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        sd[j + "mlp_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        sd[j + "attn.wqkv.weight"] = _fuse_qkv(hf, p, "weight", cfg.head_dim)
        if cfg.qkv_bias:
            sd[j + "attn.wqkv.bias"] = _fuse_qkv(hf, p, "bias", cfg.head_dim)
        sd[j + "attn.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
        if cfg.o_bias:
            sd[j + "attn.wo.bias"] = hf[p + "self_attn.o_proj.bias"]
        if cfg.qk_norm:
            sd[j + "attn.q_norm.weight"] = interleave_rope_dims(
                hf[p + "self_attn.q_norm.weight"], cfg.head_dim
            )
            sd[j + "attn.k_norm.weight"] = interleave_rope_dims(
                hf[p + "self_attn.k_norm.weight"], cfg.head_dim
            )
        sd[j + "mlp.w_gate_up.weight"] = torch.cat(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]
        )
        sd[j + "mlp.w_down.weight"] = hf[p + "mlp.down_proj.weight"]
        if cfg.mlp_bias:
            sd[j + "mlp.w_gate_up.bias"] = torch.cat(
                [hf[p + "mlp.gate_proj.bias"], hf[p + "mlp.up_proj.bias"]]
            )
            sd[j + "mlp.w_down.bias"] = hf[p + "mlp.down_proj.bias"]
        for name in [n for n in hf if n.startswith(p)]:
            del hf[name]  # drop the unfused copies as we go, to keep peak memory low
    if start == 0:
        sd["embed.weight"] = hf["model.embed_tokens.weight"]
    if end == cfg.n_layers:
        sd["norm.weight"] = hf["model.norm.weight"]
        sd["lm_head.weight"] = hf.get("lm_head.weight", hf.get("model.embed_tokens.weight"))
    return sd


def _fuse_qkv(hf: dict[str, torch.Tensor], prefix: str, kind: str, head_dim: int) -> torch.Tensor:
    """One q|k|v matrix (or bias), with q and k in the interleaved layout the RoPE code wants."""
    q, k, v = (hf[f"{prefix}self_attn.{x}_proj.{kind}"] for x in "qkv")
    return torch.cat([interleave_rope_dims(q, head_dim), interleave_rope_dims(k, head_dim), v])


def load_stage(
    path: str | Path,
    start: int = 0,
    end: int | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: ProgressFn | None = None,
    cfg: ModelConfig | None = None,
    quantize: str = "none",
) -> tuple[Stage, LoadStats]:
    """Load layers ``[start, end)`` (default: the whole model) onto ``device`` in ``dtype``, the
    layers' matrices held in ``quantize`` (none, int8, int4: engine/quant.py)."""
    t0 = time.perf_counter()
    path = Path(path)
    cfg = cfg or ModelConfig.from_dir(path)
    end = cfg.n_layers if end is None else end
    if not 0 <= start < end <= cfg.n_layers:
        raise ModelLoadError(
            f"stage [{start}, {end}) is not a layer range of this {cfg.n_layers}-layer model"
        )
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, cfg, dev)
    if is_random(path):  # drawn on the device: nothing to read
        stage, read = random_stage(cfg, start, end, seed=random_seed(path), device=dev, dtype=dt, progress=progress), (0, 0, 0)
    else:
        stage, read = _checkpoint_stage(path, cfg, start, end, dev, dt, progress)
    stage.quantize(quantize, keep_modes(path, cfg, start, end) if quantize == "keep" else None)
    stage.lay_out_for_cpu()
    return stage, LoadStats(*read, time.perf_counter() - t0)


def _checkpoint_stage(
    path: Path, cfg: ModelConfig, start: int, end: int, dev: torch.device, dt: torch.dtype, progress: ProgressFn | None
) -> tuple[Stage, tuple[int, int, int]]:
    """The stage read from the checkpoint, and (bytes read, the checkpoint's bytes, tensors read)."""
    hf, bytes_read, total_bytes, count = _read_stage(path, cfg, start, end, progress)
    sd = _stage_state_dict(hf, cfg, start, end)
    with torch.device("meta"):
        stage = Stage(cfg, start, end)
    # Convert tensor by tensor so only one extra copy exists at a time.
    for name in list(sd):
        sd[name] = sd[name].to(device=dev, dtype=dt)
    if "embed.weight" in sd and "lm_head.weight" in sd and cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    stage.load_state_dict(sd, assign=True, strict=True)
    if cfg.tie_embeddings and stage.is_first and stage.is_last:
        stage.lm_head.weight = stage.embed.weight
    stage.eval().requires_grad_(False)
    return stage, (bytes_read, total_bytes, count)


_PARTS = {  # a fused matrix of the stage, from these Hugging Face matrices of its layer
    "wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "wo": ("self_attn.o_proj",),
    "w_gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "w_down": ("mlp.down_proj",),
}


def keep_modes(path: Path, cfg: ModelConfig, start: int, end: int) -> list[dict[str, str]]:
    """For ``--quantize keep``: each layer's matrices held as precise as the GGUF stores them
    (engine/quant.py KEEP_AS); a Hugging Face folder's are kept as they are."""
    from peerpipe.engine.quant import kept

    if not path.is_file():
        return [dict.fromkeys(_PARTS, "none") for _ in range(start, end)]
    from peerpipe.engine.gguf_file import open_gguf

    model = open_gguf(str(path))
    return [
        {fused: kept([model.type_of(f"model.layers.{i}.{p}.weight") for p in parts]) for fused, parts in _PARTS.items()}
        for i in range(start, end)
    ]


def keep_width(path: str | Path | None, cfg: ModelConfig | None = None) -> str:
    """What ``--quantize keep`` takes at most per value over the whole model (int4, int8 or none):
    what a plan counts on, so it never gives a node more than it holds."""
    from peerpipe.engine.quant import widest

    if path is None:
        raise ModelLoadError("--quantize keep keeps a GGUF model's own precision: give the node --model FILE.gguf")
    path = Path(path)
    cfg = cfg or ModelConfig.from_dir(path)
    return widest([m for layer in keep_modes(path, cfg, 0, cfg.n_layers) for m in layer.values()])


def _read_stage(
    path: Path, cfg: ModelConfig, start: int, end: int, progress: ProgressFn | None
) -> tuple[dict[str, torch.Tensor], int, int, int]:
    """The stage's tensors by Hugging Face name, the bytes read, the checkpoint's bytes, the count."""
    if path.is_file():
        from peerpipe.engine.gguf_file import open_gguf

        model = open_gguf(str(path))
        available: dict[str, Any] = model.tensors
    else:
        index = checkpoint_index(path)
        available = index
    wanted = stage_tensor_names(cfg, start, end, set(available))
    missing = sorted(n for n in wanted if n not in available)
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensor(s) the stage needs, e.g. {missing[0]}")
    if path.is_file():
        _check_shapes(cfg, {n: model.shape(n) for n in wanted})
        need = sum(model.nbytes(n) for n in wanted)
        hf, done = {}, 0
        for name in wanted:  # dequantized one by one: one float32 copy at a time
            hf[name] = model.read(name)
            done += model.nbytes(name)
            if progress is not None:
                progress(done, need)
        return hf, done, sum(model.nbytes(n) for n in model.tensors), len(wanted)
    entries = [index[n] for n in wanted]
    _check_shapes(cfg, {e.name: e.shape for e in entries})
    need = sum(e.nbytes for e in entries)
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, need)

    hf, bytes_read = read_tensors(entries, on_bytes)
    return hf, bytes_read, sum(e.nbytes for e in index.values()), len(entries)


def _expected_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape config.json implies for a Hugging Face tensor name."""
    h, hd = cfg.hidden_size, cfg.head_dim
    leaf = name.rsplit(".", 2)[-2:]  # e.g. ["q_proj", "weight"]
    rows = {
        "q_proj": cfg.q_size,
        "k_proj": cfg.kv_size,
        "v_proj": cfg.kv_size,
        "o_proj": h,
        "gate_proj": cfg.intermediate_size,
        "up_proj": cfg.intermediate_size,
        "down_proj": h,
    }
    cols = {"o_proj": cfg.q_size, "down_proj": cfg.intermediate_size}
    if leaf[0] in rows:
        return (rows[leaf[0]],) if leaf[1] == "bias" else (rows[leaf[0]], cols.get(leaf[0], h))
    if leaf[0] in ("q_norm", "k_norm"):
        return (hd,)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (cfg.vocab_size, h)
    return (h,)  # input/post-attention layer norms and the final norm


def _check_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare the headers with config.json before reading a byte of tensor data."""
    for name, shape in shapes.items():
        expected = _expected_shape(cfg, name)
        if shape != expected:
            raise UnsupportedModelError(
                f"tensor {name} has shape {shape}, but config.json implies {expected}: "
                "the checkpoint and its config disagree"
            )
