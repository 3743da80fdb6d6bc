"""A layer's residual add and RMSNorm with the product that follows them: ``normed_linear``
returns ``(x + delta, linear(rms_norm(x + delta)))``.

For a decode step's row on CUDA, inside a captured graph or a compiled layer, the add and the norm
run as the prologue of the product's own kernel (bf16 or int8 one-row kernels, norm_gluon.py):
two kernels a layer fewer. Everything else runs them as separate operations, as before.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from peerpipe.engine import bf16_gluon, int8_cuda, int8_gluon
from peerpipe.engine.quant import Int8Weight, QuantWeight, glu_linear, linear

# bench/engine.py turns it off with the other kernels to time torch's in one run;
# PEERPIPE_NORM_PROLOGUE=0 turns it off in a process (stage processes in a benchmark, say).
enabled = os.environ.get("PEERPIPE_NORM_PROLOGUE", "1") != "0"


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # torch.rms_norm rather than F.rms_norm: the same kernel without a Python wrapper, on the
    # hot path twice per layer.
    if x.dtype == torch.float32 or (x.is_cuda and not torch.compiler.is_compiling()):
        # On CUDA one fused kernel normalises half precision in float32 and rounds once after
        # the weight: HF's two roundings below take four kernels (a tenth of a 1B model's
        # graphed decode step on an H200). Compiled, Inductor fuses those four anyway.
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    # Half precision: normalise in float32 and cast back before the weight, as HF does.
    return weight * torch.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def normed_linear(
    x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, w: Tensor | QuantWeight,
    bias: Tensor | None = None, glu: bool = False,
) -> tuple[Tensor, Tensor]:
    """The stream ``r = x + delta`` (``x`` without a delta) and the product of ``rms_norm(r,
    weight, eps)`` with ``w`` (and ``bias``); with ``glu`` silu(gate) * up of a fused gate|up."""
    if bias is None and fits(x, delta, weight, w, glu) and bf16_gluon.launching_is_free():
        q, scale = (w.q, w.scale) if isinstance(w, Int8Weight) else (w, None)
        r, y = _opaque(x.reshape(1, -1), None if delta is None else delta.reshape(1, -1), weight, eps, q, scale, glu)
        return (x if delta is None else r.view(x.shape)), y.view(*x.shape[:-1], y.shape[-1])
    if delta is not None:
        x = x + delta
    n = rms_norm(x, weight, eps)
    return x, (glu_linear(n, w, bias) if glu else linear(n, w, bias))


def fits(x: Tensor, delta: Tensor | None, weight: Tensor, w: Tensor | QuantWeight, glu: bool) -> bool:
    """Whether one kernel takes the add, the norm and the product (plain checks only, so that a
    compiled layer decides while it is traced)."""
    k = x.shape[-1]
    if not (
        enabled and x.is_cuda and x.dtype == torch.bfloat16 and x.numel() == k and weight.dtype == torch.bfloat16
        and weight.shape == (k,) and weight.device == x.device
        and (delta is None or (delta.shape == x.shape and delta.dtype == x.dtype and delta.device == x.device))
    ):
        return False
    if isinstance(w, Tensor):
        return w.dim() == 2 and w.shape[1] == k and bf16_gluon.fits(x, w, glu)
    if isinstance(w, Int8Weight):
        if w.q.dim() != 2 or w.q.shape[1] != k or w.q.device != x.device:
            return False
        row = x.reshape(1, k)
        return int8_cuda.glu_fits(row, w.q) if glu else int8_cuda.available() and int8_gluon.fits(row, w.q)
    return False


def _aligned(t: Tensor) -> Tensor:
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


@torch.library.custom_op("peerpipe::normed_gemv", mutates_args=())
def _opaque(
    x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, w: Tensor, scale: Tensor | None, glu: bool
) -> tuple[Tensor, Tensor]:
    """``x`` and ``delta`` ``[1, K]``; ``w`` bf16, or int8 with ``scale``. Returns ``(x + delta,
    product)``; without a delta the first is empty (the caller keeps ``x``)."""
    x, weight = _aligned(x), _aligned(weight)
    delta = None if delta is None else _aligned(delta)
    r = torch.empty_like(x) if delta is not None else x.new_empty(0)
    prologue = int8_gluon.Prologue(delta, weight, eps, x if delta is None else r)
    if scale is None:
        y = bf16_gluon.gemv(x, w, glu=glu, prologue=prologue)
    else:
        y = int8_gluon.gemv(x, w, scale, glu=glu, prologue=prologue)
    return r, y


@_opaque.register_fake
def _(
    x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, w: Tensor, scale: Tensor | None, glu: bool
) -> tuple[Tensor, Tensor]:
    n = w.shape[0] // 2 if glu else w.shape[0]
    return (x.new_empty(x.shape) if delta is not None else x.new_empty(0)), x.new_empty((x.shape[0], n))
