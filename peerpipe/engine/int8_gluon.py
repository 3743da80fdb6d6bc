"""Which Gluon int8 kernel, with which tiles, multiplies a decode step's rows (int8_cuda.py asks).

One or two rows of a small or medium matrix go to the CUDA-core kernel (int8_gluon_fma.py); more
rows, and the big matrices from two rows on, to the tensor-core one (int8_gluon_mma.py), whose
time does not grow with the rows. Tiles were chosen by sweeps on an H200 over the Llama-3.2-1B
shape's matrices (q|k|v 3072x2048, o 2048x2048, gate|up 16384x2048, down 2048x8192, the head
128256x2048); other shapes get the same rules, the k-block shrunk until it divides K, and
programs split along K until there are enough of them to fill the GPU.

Split-K partial sums go through one fp32 workspace and arrival counters per device, shared by
every call: calls must be ordered on one stream (a stage's compute thread runs one at a time).
``reserve`` allocates them; the first call does, and a stage calls it before capturing graphs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

_WORKSPACE: dict[torch.device, tuple[Tensor, Tensor]] = {}
WORKSPACE_FLOATS = 1 << 20  # ample: at most 512 programs x 128 outputs x 8 rows split
COUNTERS = 1 << 14  # a split matrix has fewer than 256 output blocks


@functools.cache
def _kernels() -> tuple[object, object] | None:
    try:
        from peerpipe.engine.int8_gluon_fma import fma_kernel
        from peerpipe.engine.int8_gluon_mma import mma_kernel
    except Exception:  # no Triton, or one without Gluon (older than 3.5) or without these layouts
        return None
    return fma_kernel, mma_kernel


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)  # mma.sync m16n8k16 in bf16


# On by default; PEERPIPE_PDL=0 turns it off in a process (bench/quantize.py and stage processes
# read it alike).
overlap = os.environ.get("PEERPIPE_PDL", "1") != "0"

# Products of fewer weights launch as programmatic dependents (launch_options); larger ones (LM
# heads, the 8B shape's gate|up) as before. bench/pdl.py moves it to compare.
dependent_below = 100_000_000


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def overlaps(device: torch.device) -> bool:
    """Whether the int8 one-row products may launch as programmatic dependents on ``device``:
    not turned off (``PEERPIPE_PDL=0``) and Hopper or later. A kernel's programs then start, and
    issue their first weight loads, while the kernel before it ends; each waits for it
    (``griddepcontrol.wait``) before reading anything a step writes, and then lets the next one
    start."""
    index = torch.cuda.current_device() if device.index is None else device.index
    return overlap and _hopper(index)


def launch_options(device: torch.device, weights: int) -> dict[str, bool]:
    """A one-row product's ``PDL`` constexpr and launch option on ``device`` for a matrix of
    ``weights`` numbers: dependent where it ``overlaps`` and below ``dependent_below`` weights.
    Measured on an H200 (int8, graphed steps, on against off alternating in one process):
    dependent launches for every product gained the 1B shape 1.3% and cost the 8B shape 2.1%;
    with the large ones launched as before, 1.2% and 0.3% (docs/engine.md)."""
    return dict(PDL=True, launch_pdl=True) if overlaps(device) and weights < dependent_below else dict(PDL=False)


def fits(x: Tensor, q: Tensor) -> bool:
    """Whether these kernels take ``x`` ``[M, K]`` (M <= 8, bf16 on a capable GPU) times ``q``."""
    k = x.shape[-1]
    return (
        x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] <= 8 and k % 64 == 0 and q.is_contiguous()
        and _capable(x.device.index or 0) and _kernels() is not None
    )


def reserve(device: torch.device) -> tuple[Tensor, Tensor]:
    """The device's split-K workspace and (zeroed) counters, allocated once."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    if device not in _WORKSPACE:
        _WORKSPACE[device] = (
            torch.empty(WORKSPACE_FLOATS, dtype=torch.float32, device=device),
            torch.zeros(COUNTERS, dtype=torch.int32, device=device),
        )
    return _WORKSPACE[device]


@dataclass(frozen=True)
class Prologue:
    """A layer's residual add and RMSNorm run by a one-row product's programs (norm_gluon.py): x
    is the stream h, the product takes ``weight * norm(h + delta)``, and ``out`` receives
    ``h + delta`` (unused without a delta). Tensors bf16 and aligned to 16 bytes."""

    delta: Tensor | None
    weight: Tensor
    eps: float
    out: Tensor

    def args(self, word: torch.dtype, k: int, step_words: int, split_words: int) -> tuple[tuple, dict[str, object]]:
        """The kernels' arguments (``d_ptr, g_ptr, r_ptr, eps, K``) and constexprs for rows of
        ``k`` numbers in words of ``word``, ``split_words`` a program taken ``step_words`` a step."""
        steps = split_words // step_words
        d = self.delta if self.delta is not None else self.out
        ptrs = (d.view(word), self.weight.view(word), self.out.view(word))
        return (*ptrs, self.eps, k), dict(NORM=True, HAS_DELTA=self.delta is not None, STEPS=steps,
                                          P2=1 << (steps - 1).bit_length())


def no_prologue(x: Tensor) -> tuple[tuple, dict[str, object]]:
    """The kernels' prologue arguments when there is none (the pointers are never read)."""
    return (x, x, x, 0.0, 0), dict(NORM=False, HAS_DELTA=False, STEPS=1, P2=1)


def _splits(blocks: int, k_words: int, step_words: int, target: int, most: int) -> int:
    """Programs along K: doubled until ``target`` programs run, each keeping two steps or more."""
    split = 1
    while (blocks * split < target and split < most and k_words % (step_words * split * 2) == 0
           and k_words // (step_words * split * 2) >= 2):
        split *= 2
    return split


def choose(n: int, k: int, m: int) -> tuple[str, dict[str, int], int]:
    """(kernel, tiles, programs along K) for an ``[n, k]`` matrix and ``m`` rows."""
    big = n * k >= 100_000_000  # an LM head
    mid = n * k >= 24_000_000  # a fused gate|up
    long_k = k >= 4096  # a down projection
    words = k // 4
    if m == 1 or (m == 2 and not big and not mid):
        rows, tk, warps = (4, 16, 4) if big else (4, 32, 8) if (mid or long_k) else (1, 32, 8)
        while words % (tk * 4) and tk > 1:
            tk //= 2
        tiles = dict(R=rows, TN=32 // tk, TK=tk, W=warps)
        block = rows * (32 // tk) * warps
        return "fma", tiles, _splits(-(-n // block), words, tk * 4, target=256, most=4)
    wn, wk, rkb = (4, 1, 4) if big else (2, 2, 4) if mid else (2, 2, 2) if long_k else (1, 4, 4)
    while words % (16 * wk * rkb) and rkb > 1:
        rkb //= 2
    while words % (16 * wk * rkb) and wk > 1:
        wk //= 2
        wn *= 2
    return "mma", dict(WN=wn, WK=wk, RKB=rkb), _splits(-(-n // (16 * wn)), words, 16 * wk * rkb, target=512, most=8)


def glu_tiles(n: int, k: int) -> dict[str, int]:
    """The CUDA-core kernel's tiles for silu(gate) * up of one row, ``n`` outputs from a fused
    ``[2n, k]`` gate|up: each program reads as many rows as for the plain product, half of them
    up rows (R halved, or the warps when R is 1). On the 1B shape's MLP an H200 sweep of 18 tile
    choices found none faster by more than 0.3%."""
    kind, tiles, _ = choose(2 * n, k, 1)
    assert kind == "fma"
    if tiles["R"] > 1:
        return dict(tiles, R=tiles["R"] // 2)
    return dict(tiles, W=max(1, tiles["W"] // 2))


def gemv(x: Tensor, q: Tensor, scale: Tensor, glu: bool = False, prologue: Prologue | None = None) -> Tensor:
    """``x`` ``[M, K]`` bf16 times int8 ``q`` ``[N, K]`` scaled per row: ``[M, N]`` bf16 (``fits``).
    ``glu`` (one row): silu(gate) * up of a fused gate|up ``q``, ``[1, N/2]``. ``prologue`` (one
    row): x is the residual stream, normalized first (``Prologue``)."""
    kernels = _kernels()
    assert kernels is not None
    fma, mma = kernels
    m, k = x.shape
    n = q.shape[0] // 2 if glu else q.shape[0]
    if (glu or prologue is not None) and m != 1:
        raise ValueError(f"silu(gate) * up or a norm in one kernel takes one row, not {m}")
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)  # whole int64 loads need aligned rows
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    workspace, counters = reserve(x.device)
    kind, tiles, split = ("fma", glu_tiles(n, k), 1) if glu else choose(n, k, m)
    xw, qw, words = x.view(torch.int64), q.view(torch.int32), k // 4
    if kind == "fma":
        block = tiles["R"] * tiles["TN"] * tiles["W"]
        step = tiles["TK"] * 4
        extra, norm = prologue.args(torch.int64, k, step, words // split) if prologue else no_prologue(xw)
        fma[(-(-n // block), split)](  # type: ignore[index]
            xw, qw, scale, y, workspace, counters, n, words, words // split, xw.stride(0), y.stride(0), split,
            n * words, *extra, MR=m, R=tiles["R"], TN=tiles["TN"], TK=tiles["TK"], W=tiles["W"],
            EVEN_N=n % block == 0, GLU=glu, num_warps=tiles["W"], **launch_options(x.device, q.numel()), **norm,
        )
    else:
        if prologue is not None:
            raise ValueError("a norm runs in the CUDA-core kernel only")
        block = 16 * tiles["WN"]
        mma[(-(-n // block), split)](  # type: ignore[index]
            xw, qw, scale, y, workspace, counters, m, n, words, words // split, xw.stride(0), y.stride(0), split,
            WN=tiles["WN"], WK=tiles["WK"], RKB=tiles["RKB"], EVEN_N=n % block == 0,
            num_warps=tiles["WN"] * tiles["WK"],
        )
    return y
