"""int8 weight-only matrix-vector products on CUDA (Triton), for decode steps.

A decode step multiplies a few rows of activations by every weight matrix once: its time is the
bytes of the weights read. Dequantizing an int8 matrix into bf16 first and calling cuBLAS reads
one byte, writes two and reads two per weight (measured 0.38x bf16 on an H200); these kernels
read the int8 bytes once and scale each output, so they read half of what bf16 does. Prefill
(many rows) is compute-bound and keeps the dequantize-and-matmul path.

bf16 rows on a GPU of compute capability 8.0 or later, where Triton has Gluon, go through the
Gluon kernels (int8_gluon_fma.py for one or two rows, int8_gluon_mma.py on tensor cores for more
and for large matrices): on an H200 the 1B shape's four matrices at 2.2 TB/s of int8, 1.66x
bf16's cuBLAS (docs/quantization.md). Other rows use the plain Triton kernel below (0.7x bf16).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from peerpipe.engine import int8_gluon

MAX_ROWS = 8  # more rows than this: a real matrix product pays (engine/quant.py falls back)


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():  # type: ignore[no-untyped-def]
    import triton
    import triton.language as tl

    @triton.jit
    def int8_gemv(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_x, stride_y,  # type: ignore[no-untyped-def]
                  M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, M_PAD)
        rk = tl.arange(0, BLOCK_K)
        # Products accumulate element by element and are summed across the block once at the end:
        # a reduction across threads in every step would cost more than the loads.
        acc = tl.zeros((M_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            if EVEN_K:  # no mask along K: the loads can be 16 bytes wide
                w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=rn[:, None] < N, other=0)
                x = tl.load(x_ptr + rm[:, None] * stride_x + kk[None, :], mask=rm[:, None] < M, other=0.0)
            else:
                w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0)
                x = tl.load(x_ptr + rm[:, None] * stride_x + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                            other=0.0)
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        out = tl.sum(acc, axis=2) * scale[None, :]
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return int8_gemv


# (rows padded, block of outputs, block of inputs, warps) of the plain Triton kernel: chosen on an
# H200 (bench/quantize.py).
CONFIG = {1: (1, 512, 4), 2: (1, 2048, 8), 4: (4, 512, 8), 8: (2, 512, 4)}


def int8_gemv(x: Tensor, q: Tensor, scale: Tensor, config: tuple[int, int, int] | None = None,
              glu: bool = False) -> Tensor:
    """``x`` ``[M, K]`` (M <= MAX_ROWS) times int8 ``q`` ``[N, K]`` scaled per row by ``scale``
    ``[N]``: ``[M, N]`` in ``x``'s dtype. ``config`` forces the plain Triton kernel's tiles.
    ``glu`` (one row where ``glu_fits``): silu(gate) * up of a fused gate|up ``q``, ``[1, N/2]``."""
    m, k = x.shape
    n = q.shape[0]
    if m > MAX_ROWS or q.shape[1] != k:
        raise ValueError(f"int8_gemv takes at most {MAX_ROWS} rows of width {q.shape[1]}, not {tuple(x.shape)}")
    if config is None and torch.compiler.is_compiling():
        return _opaque(x, q, scale, glu)  # torch.compile'd layers: one call it does not trace into
    if glu:
        return int8_gluon.gemv(x, q, scale, glu=True)
    if config is None and int8_gluon.fits(x, q):
        return int8_gluon.gemv(x, q, scale)
    x = x.contiguous()
    pad = 1 << max(0, (m - 1).bit_length())
    block_n, block_k, warps = config or CONFIG[pad]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (-(-n // block_n),)
    _kernel()[grid](x, q, scale, y, m, n, k, x.stride(0), y.stride(0), M_PAD=pad, BLOCK_N=block_n, BLOCK_K=block_k,
                    EVEN_K=k % block_k == 0, num_warps=warps)
    return y


def glu_fits(x: Tensor, q: Tensor) -> bool:
    """Whether silu(gate) * up of ``x`` ``[..., K]`` times a fused int8 gate|up ``q`` runs in one
    kernel: one bf16 row on a GPU that runs the Gluon kernels."""
    return available() and x.numel() == x.shape[-1] and q.shape[0] % 2 == 0 and int8_gluon.fits(x, q)


@torch.library.custom_op("peerpipe::int8_gemv", mutates_args=())
def _opaque(x: Tensor, q: Tensor, scale: Tensor, glu: bool = False) -> Tensor:
    return int8_gemv(x, q, scale, glu=glu)


@_opaque.register_fake
def _(x: Tensor, q: Tensor, scale: Tensor, glu: bool = False) -> Tensor:
    return x.new_empty((x.shape[0], q.shape[0] // 2 if glu else q.shape[0]))
