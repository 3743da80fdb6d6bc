"""Llama 3.1+ RoPE scaling from a GGUF: llama.cpp stores the per-dimension frequency factors
(``rope_freqs.weight``), not the parameters they come from; the engine wants the parameters.

Per dimension of wavelength ``w``, the factor is 1 for short wavelengths, ``factor`` for long
ones, and in between ``1 / ((1 - s) / factor + s)`` with ``s = a / w + b`` (``a`` =
original_max / (high - low), ``b`` = -low / (high - low)). Only ``factor``, ``a`` and ``b``
matter, so ``low`` is taken as 1 and the others follow; the parameters are then checked by
recomputing every factor with the engine's own RoPE code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from peerpipe.engine.errors import UnsupportedModelError
from peerpipe.engine.rope import rope_from_hf, rope_inv_freq


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _wavelengths(config: dict[str, Any]) -> torch.Tensor:
    dim = _head_dim(config)
    inv = 1.0 / (float(config["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return 2 * math.pi / inv.double()


def llama3_scaling(config: dict[str, Any], factors: torch.Tensor, path: Path) -> dict[str, Any]:
    """The ``rope_scaling`` entry that gives exactly ``factors``, or a clear refusal."""
    wl, f = _wavelengths(config), factors.double()
    refuse = UnsupportedModelError(f"{path}: its RoPE frequency factors (rope_freqs) are not Llama 3's scaling; use the model's Hugging Face folder")
    if f.shape != wl.shape or not torch.isfinite(f).all() or (f < 1 - 1e-6).any():
        raise refuse
    factor = round(float(f.max()), 4)
    if factor <= 1 + 1e-6:
        return {"rope_type": "default"}
    blend = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    if int(blend.sum()) >= 2:
        s = (1 / f[blend] - 1 / factor) / (1 - 1 / factor)
        x = torch.stack([1 / wl[blend], torch.ones_like(s)], dim=1)
        a, b = torch.linalg.lstsq(x, s[:, None]).solution[:, 0].tolist()
        if b >= 0 or a <= 0:
            raise refuse
        # Fitted in float32 noise: the parameters people publish are round numbers, and the check
        # below refuses a rounding that would change a factor.
        high = round(1 - 1 / b, 3)
        original = a * (high - 1)
    else:  # no blended band: Llama's usual band, placed between the kept and the scaled wavelengths
        kept, scaled = wl[f <= 1 + 1e-4], wl[f >= factor * (1 - 1e-4)]
        high, original = 4.0, float(scaled.min()) if len(scaled) else 8192.0
        if len(kept) and original <= 4 * float(kept.max()):
            raise refuse
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": high,
        "original_max_position_embeddings": max(1, round(original)),
    }
    rope, dim = rope_from_hf({**config, "rope_scaling": scaling}), _head_dim(config)
    base = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not torch.allclose(base / rope_inv_freq(rope, dim), factors.float(), rtol=1e-3):
        raise refuse
    return scaling
