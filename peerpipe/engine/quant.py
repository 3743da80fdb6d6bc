"""Weights held in fewer bits, so a small node holds more layers: the linear layers' matrices as
int8 with one scale per output channel, or as int4 with a scale and zero point per group of
``INT4_GROUP`` inputs. Norms, biases, the embedding and the head keep the model's dtype.

A quantized matrix multiplies through ``linear``: int8 on a CPU uses PyTorch's int8 weight-only
kernel (``aten._weight_int8pack_mm``), on CUDA a decode step's few rows use a Triton kernel that
reads the int8 bytes once (``int8_cuda.py``); elsewhere, and for prompts, it is dequantized into
the activations' dtype for the product; int4 is unpacked and dequantized for each product
(memory, not speed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from peerpipe.engine import bf16_gluon, int8_cuda
from peerpipe.engine.errors import EngineError

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP = 64  # plan/spec.py QUANT_BYTES_PER_VALUE counts its scales and zero points


class QuantizeError(EngineError, ValueError):
    """A quantization setting that does not exist, or a matrix it cannot apply to."""


LOAD_MODES = (*QUANT_MODES, "keep")  # keep: each matrix as precise as its GGUF type, no more
ROOM_MODES = (*LOAD_MODES, "auto")  # a room's node may let the planner choose

# What a GGUF matrix's type is held as with --quantize keep: 4-bit types in int4 (in KEEP_GROUP,
# the 32-value blocks of Q4_0 and Q4_1, so those requantize almost exactly),
# 5- to 8-bit types in int8 (a scale per output channel), floating point types as they are.
KEEP_AS = {"Q4_0": "int4-q4_0", "Q4_1": "int4", "Q4_K": "int4", "Q5_0": "int8", "Q5_1": "int8", "Q5_K": "int8",
           "Q6_K": "int8", "Q8_0": "int8"}
_PRECISION = {"int4-q4_0": 0, "int4": 1, "int8": 2, "none": 3}
KEEP_GROUP = 32
FP16_TINY = 2.0**-14  # the smallest normal float16: a smaller scale would round to zero


def kept(kinds: list[str]) -> str:
    """How a matrix fused from parts of GGUF types ``kinds`` is kept: as its most precise part."""
    return max((KEEP_AS.get(k, "none") for k in kinds), key=_PRECISION.__getitem__)


def widest(modes: list[str]) -> str:
    """Of a stage's modes, the one that takes the most memory (what a plan should count on)."""
    return max(modes, key=_PRECISION.__getitem__).replace("int4-q4_0", "int4") if modes else "none"


def check_mode(mode: str, modes: tuple[str, ...] = QUANT_MODES) -> str:
    if mode not in modes:
        raise QuantizeError(f"quantize must be one of {', '.join(modes)}, not {mode!r}")
    return mode


@dataclass(frozen=True)
class Int8Weight:
    """``q`` int8 ``[out, in]``, ``scale`` ``[out]`` (the activations' dtype): w = q * scale."""

    q: Tensor
    scale: Tensor

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return self.q.to(dtype) * self.scale.to(dtype).unsqueeze(1)

    def linear(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            # The CPU kernel is fast with bf16 activations (measured 2.6x an fp32 matmul on a
            # 75M model, and slower than fp32 with fp32 ones): an fp32 stage crosses to bf16 here.
            flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale.to(torch.bfloat16))
            return out.view(*x.shape[:-1], self.q.shape[0]).to(x.dtype)
        rows = x.numel() // max(1, x.shape[-1])
        if x.is_cuda and rows <= int8_cuda.MAX_ROWS and int8_cuda.available():
            # A decode step: the kernel reads the int8 bytes once (engine/int8_cuda.py).
            out = int8_cuda.int8_gemv(x.reshape(rows, x.shape[-1]), self.q, self.scale)
            return out.view(*x.shape[:-1], self.q.shape[0])
        return F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)


@dataclass(frozen=True)
class Int4Weight:
    """Two 4-bit values a byte (``packed`` uint8 ``[out, in / 2]``), and per group of ``group``
    inputs a float16 ``scale`` and ``zero`` ``[out, in / group]``: w = (q - zero) * scale.

    On a CPU the values are held instead in PyTorch's own int4 layout (``cpu_packed``, with
    ``cpu_scales`` ``[in / group, out, 2]``: a scale and the value of q = 8, in bf16), which its
    int4 kernel multiplies without unpacking; ``packed``, ``scale`` and ``zero`` are then empty."""

    packed: Tensor
    scale: Tensor
    zero: Tensor
    group: int = INT4_GROUP  # inputs per scale and zero point
    cpu_packed: Tensor | None = None
    cpu_scales: Tensor | None = None

    @property
    def nbytes(self) -> int:
        parts = (self.packed, self.scale, self.zero, self.cpu_packed, self.cpu_scales)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def shape(self) -> tuple[int, int]:
        if self.cpu_scales is not None:
            return self.cpu_scales.shape[1], self.cpu_scales.shape[0] * self.group
        return self.scale.shape[0], self.scale.shape[1] * self.group

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        if self.cpu_packed is not None and self.cpu_scales is not None and not self.packed.numel():
            eye = torch.eye(self.shape[1], dtype=torch.bfloat16)  # the kernel's product with I is W^T
            w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.cpu_packed, self.group, self.cpu_scales)
            return w_t.t().to(dtype)
        low = (self.packed & 0x0F).to(torch.int16)
        high = (self.packed >> 4).to(torch.int16)
        q = torch.stack((low, high), dim=-1).view(self.packed.shape[0], -1)  # [out, in]
        groups = q.view(q.shape[0], -1, self.group).to(dtype)
        w = (groups - self.zero.to(dtype).unsqueeze(-1)) * self.scale.to(dtype).unsqueeze(-1)
        return w.view(q.shape)

    def linear(self, x: Tensor) -> Tensor:
        if self.cpu_packed is not None and x.device.type == "cpu":
            # PyTorch's CPU int4 kernel, fast with bf16 activations (measured 47 us against fp32's
            # 71 us for a 1536 x 576 matrix, and 5.4 ms unpacking): a stage crosses to bf16 here.
            flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.cpu_packed, self.group, self.cpu_scales)
            return out.view(*x.shape[:-1], self.shape[0]).to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype))

    def for_cpu(self) -> Int4Weight:
        """The same values in PyTorch's CPU int4 layout (where this PyTorch has the kernel)."""
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") or self.group not in (32, 64, 128, 256):
            return self
        low, high = (self.packed & 0x0F).to(torch.int32), (self.packed >> 4).to(torch.int32)
        q = torch.stack((low, high), dim=-1).view(self.packed.shape[0], -1)
        scale = self.scale.float()
        offset = (8 - self.zero.float()) * scale  # the weight where q = 8
        scales = torch.stack((scale, offset), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        empty = self.packed.new_empty(0)
        return Int4Weight(empty, self.scale.new_empty(0), self.zero.new_empty(0), self.group, packed, scales)


QuantWeight = Int8Weight | Int4Weight


def quantize(
    w: Tensor, mode: str, group: int = INT4_GROUP, *, exact_zero: bool = False, cpu_kernel: bool = True
) -> Tensor | QuantWeight:
    """``w`` ``[out, in]`` in ``mode`` (``none`` returns it as it is); int4 in groups of ``group``,
    with ``exact_zero`` a zero point that need not be a whole number: a group that already lies on a
    4-bit affine grid (a GGUF's Q4_0, Q4_1 or Q4_K block) is then held exactly. int4 on a CPU is
    held in PyTorch's kernel layout unless ``cpu_kernel`` is False (its scales are bf16)."""
    check_mode(mode, (*QUANT_MODES, "int4-q4_0"))
    if mode == "none":
        return w
    if w.dim() != 2:
        raise QuantizeError(f"only matrices are quantized, not a tensor of shape {tuple(w.shape)}")
    x = w.detach().float().contiguous()  # rows whole even where a CPU stage holds w by columns
    if mode == "int4-q4_0":  # Q4_0's grid: d * (q - 8), d from the group's largest magnitude
        held = _q4_0_grid(x, group)
        return held.for_cpu() if cpu_kernel and w.device.type == "cpu" else held
    if mode == "int8":
        scale = (x.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = (x / scale.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
        return Int8Weight(q.contiguous(), scale.to(w.dtype))
    if x.shape[1] % group:
        raise QuantizeError(f"int4 needs the input size to be a multiple of {group}, not {x.shape[1]}")
    groups = x.view(x.shape[0], -1, group)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=FP16_TINY).to(torch.float16)  # a flat group still has a scale
    zero = (-low / scale.float()) if exact_zero else (-low / scale.float()).round_().clamp_(0, 15)
    # A whole-number zero point fits float16; an exact one far from the group's range may not.
    zero = zero.to(torch.float16 if zero.abs().max() < 6e4 else torch.float32)
    q = (groups / scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).round_().clamp_(0, 15).to(torch.uint8)
    q = q.view(x.shape[0], -1)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    held = Int4Weight(packed, scale, zero, group)
    return held.for_cpu() if cpu_kernel and w.device.type == "cpu" else held


def _q4_0_grid(x: Tensor, group: int) -> Int4Weight:
    """Values that lie on Q4_0's grid held exactly: the group's value of largest magnitude is
    8 steps from zero, on the negative side (zero point 8) or the positive (7)."""
    if x.shape[1] % group:
        raise QuantizeError(f"int4 needs the input size to be a multiple of {group}, not {x.shape[1]}")
    groups = x.view(x.shape[0], -1, group)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scale = (extreme.abs() / 8).clamp(min=FP16_TINY).to(torch.float16)
    zero = torch.where(extreme < 0, 8.0, 7.0).to(torch.float16)
    q = (groups / scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).round_().clamp_(0, 15).to(torch.uint8)
    q = q.view(x.shape[0], -1)
    return Int4Weight((q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scale, zero, group)


def linear(x: Tensor, w: Tensor | QuantWeight, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` for a plain or a quantized matrix."""
    if isinstance(w, Tensor):
        return bf16_gluon.linear(x, w, bias)
    out = w.linear(x)
    return out + bias if bias is not None else out


def glu_linear(x: Tensor, w: Tensor | QuantWeight, bias: Tensor | None = None) -> Tensor:
    """silu(gate) * up of a gated MLP's fused gate|up product ``linear(x, w, bias)``: ``[..., N/2]``.
    A decode step's row on CUDA gets it from one kernel (bf16 or int8), which saves a launch
    and a round trip of the activations a layer."""
    if bias is None and isinstance(w, Tensor):
        out = bf16_gluon.glu(x, w)
        if out is not None:
            return out
    elif bias is None and isinstance(w, Int8Weight) and x.is_cuda:
        row = x.reshape(-1, x.shape[-1])
        if int8_cuda.glu_fits(row, w.q):
            return int8_cuda.int8_gemv(row, w.q, w.scale, glu=True).view(*x.shape[:-1], w.q.shape[0] // 2)
    gate, up = linear(x, w, bias).chunk(2, -1)
    return F.silu(gate, inplace=True).mul_(up)
