"""Which matrices of a decode step go through the bf16 Gluon kernel (bf16_gluon_fma.py), with
which tiles; ``linear`` is what the model calls for a plain matrix.

One bf16 row (a single answer's decode step) on a GPU of compute capability 8.0 or later, inside
a captured graph or a compiled layer, times a matrix whose rows are whole 16-byte words: the
kernel, where it beat cuBLAS on an H200 (``choose`` says None elsewhere, and cuBLAS runs).
Tiles were chosen by a sweep over the Llama-3.2-1B and Llama-3-8B shapes' matrices
(``bench/kernels.py``). Split-K uses the int8 kernels' workspace (int8_gluon.py): calls are
ordered on one stream.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from peerpipe.engine import int8_gluon

MAX_ROWS = 1
enabled = True  # bench/engine.py turns it off to time cuBLAS in the same run
_ready = False  # prepare() found a capable GPU and Gluon


@functools.cache
def _kernel() -> object | None:
    try:
        from peerpipe.engine.bf16_gluon_fma import bf16_kernel
    except Exception:  # no Triton, or one without Gluon (older than 3.5)
        return None
    return bf16_kernel


def choose(n: int, k: int, m: int) -> tuple[dict[str, int], int] | None:
    """(tiles, programs along K) for an ``[n, k]`` bf16 matrix and ``m`` rows, or None: cuBLAS.

    One row only: with two, cuBLAS was as fast or faster on every matrix swept. Each thread
    reads one weight row a step (R=1), a warp a row's 128 (TK=32) or two rows' 64 (TK=16) words."""
    if m > MAX_ROWS or k % 512:
        return None
    if n * k >= 100_000_000:  # an LM head (or the 8B gate|up, even either way): programs enough unsplit
        return dict(R=1, TN=1, TK=32, W=4), 1
    if k >= 8192:  # a down projection: few outputs, long rows, split along K
        tiles = dict(R=1, TN=2, TK=16, W=8)
        return tiles, int8_gluon._splits(-(-n // 16), k // 2, 64, target=512, most=8)
    if n * k >= 30_000_000:  # a fused gate|up
        return dict(R=1, TN=2, TK=16, W=8), 1
    return dict(R=1, TN=1, TK=32, W=8 if n * k >= 20_000_000 else 4), 1


def prepare(device: torch.device) -> bool:
    """Turn the kernel on for this process if ``device`` can run it, and allocate the split-K
    workspace (before any graph is captured). Returns whether it is on."""
    global _ready
    if device.type == "cuda" and int8_gluon._capable(device.index or 0) and _kernel() is not None:
        int8_gluon.reserve(device)
        _ready = True
    return _ready


def fits(x: Tensor, w: Tensor) -> bool:
    """Whether the kernel takes ``x`` ``[..., K]`` times ``w`` ``[N, K]`` (plain checks only, so
    that a compiled layer decides while it is traced)."""
    return (
        enabled and _ready and x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
        and w.dim() == 2 and w.is_contiguous() and choose(w.shape[0], w.shape[1], x.numel() // x.shape[-1]) is not None
    )


def gemv(x: Tensor, w: Tensor, plan: tuple[dict[str, int], int] | None = None) -> Tensor:
    """``x`` ``[1, K]`` bf16 times ``w`` ``[N, K]`` bf16: ``[1, N]`` (``fits``); ``plan``
    forces tiles and split (the sweep)."""
    if torch.compiler.is_compiling():
        return _opaque(x, w)  # torch.compile'd layers: one call it does not trace into
    m, k = x.shape
    n = w.shape[0]
    plan = plan or choose(n, k, m)
    if plan is None or m != 1 or w.shape[1] != k:
        raise ValueError(f"the bf16 kernel takes one row of a width that 512 divides, not {tuple(x.shape)}")
    tiles, split = plan
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)  # whole-word loads need aligned rows
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    workspace, counters = int8_gluon.reserve(x.device)
    xw, ww, words = x.view(torch.int32), w.view(torch.int32), k // 2
    block = tiles["R"] * tiles["TN"] * tiles["W"]
    _kernel()[(-(-n // block), split)](  # type: ignore[index]
        xw, ww, y, workspace, counters, n, words, words // split, split,
        R=tiles["R"], TN=tiles["TN"], TK=tiles["TK"], W=tiles["W"], EVEN_N=n % block == 0, num_warps=tiles["W"],
    )
    return y


def launching_is_free() -> bool:
    """Inside a captured graph or a compiled layer. Launched one by one from Python, as an eager
    step does, a Triton kernel costs tens of µs of host time against cuBLAS's few (measured: an
    eager 1B step at half the speed)."""
    return torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, through the kernel for a decode step's row where it is faster."""
    if bias is None and fits(x, w) and launching_is_free():
        return gemv(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, bias)


@torch.library.custom_op("peerpipe::bf16_gemv", mutates_args=())
def _opaque(x: Tensor, w: Tensor) -> Tensor:
    return gemv(x, w)


@_opaque.register_fake
def _(x: Tensor, w: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))
