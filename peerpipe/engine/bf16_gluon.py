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


def choose(n: int, k: int, m: int, glu: bool = False) -> tuple[dict[str, int], int] | None:
    """(tiles, programs along K) for an ``[n, k]`` bf16 matrix and ``m`` rows, or None: cuBLAS.

    One row only: with two, cuBLAS was as fast or faster on every matrix swept. Each thread
    reads one weight row a step (R=1), a warp a row's 128 (TK=32) or two rows' 64 (TK=16) words.
    ``glu``: the ``n`` outputs of silu(gate) * up from a fused ``[2n, k]`` gate|up (each output
    reads two rows)."""
    if m > MAX_ROWS or k % 512:
        return None
    if glu:  # the sweep's best for the 1B (2048 wide) and 8B (4096) shapes' MLPs; 16 outputs a program
        return (dict(R=2, TN=2, TK=16, W=4) if k >= 4096 else dict(R=4, TN=1, TK=32, W=4)), 1
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


def fits(x: Tensor, w: Tensor, glu: bool = False) -> bool:
    """Whether the kernel takes ``x`` ``[..., K]`` times ``w`` ``[N, K]`` (with ``glu``, a fused
    gate|up: N even); plain checks only, so that a compiled layer decides while it is traced."""
    n = w.shape[0] // 2 if glu else w.shape[0]
    return (
        enabled and _ready and x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
        and w.dim() == 2 and w.is_contiguous() and (not glu or w.shape[0] % 2 == 0)
        and choose(n, w.shape[1], x.numel() // x.shape[-1], glu) is not None
    )


def gemv(x: Tensor, w: Tensor, plan: tuple[dict[str, int], int] | None = None, glu: bool = False,
         prologue: int8_gluon.Prologue | None = None) -> Tensor:
    """``x`` ``[1, K]`` bf16 times ``w`` ``[N, K]`` bf16: ``[1, N]`` (``fits``); ``plan``
    forces tiles and split (the sweep). ``glu``: silu(x gate^T) * (x up^T) of a fused gate|up
    ``w``, ``[1, N/2]``. ``prologue``: x is the residual stream, normalized first."""
    if torch.compiler.is_compiling():
        # torch.compile'd layers: one call it does not trace into (a norm goes through normed.py's op)
        assert prologue is None and plan is None
        return _opaque(x, w, glu)
    m, k = x.shape
    n = w.shape[0] // 2 if glu else w.shape[0]
    plan = plan or choose(n, k, m, glu)
    if plan is None or m != 1 or w.shape[1] != k or (glu and plan[1] != 1):
        raise ValueError(f"the bf16 kernel takes one row of a width that 512 divides, not {tuple(x.shape)}")
    tiles, split = plan
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)  # whole-word loads need aligned rows
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    workspace, counters = int8_gluon.reserve(x.device)
    xw, ww, words = x.view(torch.int32), w.view(torch.int32), k // 2
    block = tiles["R"] * tiles["TN"] * tiles["W"]
    step = tiles["TK"] * 4
    extra, norm = prologue.args(torch.int32, k, step, words // split) if prologue else int8_gluon.no_prologue(xw)
    _kernel()[(-(-n // block), split)](  # type: ignore[index]
        xw, ww, y, workspace, counters, n, words, words // split, split, n * words, *extra,
        R=tiles["R"], TN=tiles["TN"], TK=tiles["TK"], W=tiles["W"], EVEN_N=n % block == 0, GLU=glu,
        num_warps=tiles["W"], **norm,
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


def glu(x: Tensor, w: Tensor) -> Tensor | None:
    """silu(gate) * up of ``x`` ``[..., K]`` times a fused gate|up ``w`` ``[2N, K]`` in one
    kernel, for a decode step's row where it runs; None elsewhere (the caller runs the product)."""
    if fits(x, w, glu=True) and launching_is_free():
        return gemv(x.reshape(-1, x.shape[-1]), w, glu=True).view(*x.shape[:-1], w.shape[0] // 2)
    return None


@torch.library.custom_op("peerpipe::bf16_gemv", mutates_args=())
def _opaque(x: Tensor, w: Tensor, glu: bool = False) -> Tensor:
    return gemv(x, w, glu=glu)


@_opaque.register_fake
def _(x: Tensor, w: Tensor, glu: bool = False) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0] // 2 if glu else w.shape[0]))
