"""bf16 products of one row on CUDA cores (Gluon), for decode steps: ``y[N] = w[N, K] @ x[K]``.

cuBLAS's kernels for a single row read a 1B layer's matrices at about 2.9 TB/s on an H200, well
under the copy bandwidth; a decode step is nothing but those reads. This kernel has the int8
kernel's shape (int8_gluon_fma.py): each thread loads 16 contiguous bytes of a weight row as four
int32 words, each word two bf16 that become exact fp32 by a shift and a mask (a bf16 is the high
half of its fp32), multiplies them by x loaded the same way straight into the layout the product
needs, and sums in registers; threads are summed once after the K loop, the next tile's loads are
issued before the current one is multiplied, and short matrices split along K through the shared
workspace (int8_gluon.py).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from peerpipe.engine.int8_gluon_fma import _row_tiles, _stores
from peerpipe.engine.norm_gluon import _bf16x2_to_f32, normed_slice


@gluon.jit
def bf16_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr, N, KW, K_SPLIT, SPLIT_K, UP,  # type: ignore[no-untyped-def]
                d_ptr, g_ptr, r_ptr, eps, K,
                R: gl.constexpr, TN: gl.constexpr, TK: gl.constexpr, W: gl.constexpr,
                EVEN_N: gl.constexpr, GLU: gl.constexpr, NORM: gl.constexpr, HAS_DELTA: gl.constexpr,
                STEPS: gl.constexpr, P2: gl.constexpr):
    """``x_ptr``: x as int32 ``[K/2]``; ``w_ptr``: w as int32
    ``[N, KW]`` (KW = K/2); ``K_SPLIT``: words of K per program along K. Each thread holds R rows
    of 16 bytes; a warp is TN x TK threads; W warps along N. With ``GLU`` (and no split) w is a
    fused gate|up ``[2N, KW]`` whose up rows start ``UP`` words in, and y is silu(gate) * up:
    gate and up rounded to bf16 first, as their product rounds them, then silu(gate) * up in
    float32 rounded once, as a compiled layer's fused kernel does. The activation of a gated MLP
    without a kernel of its own. With ``NORM``, x is h and the product takes g * norm(h + d)
    (norm_gluon.py; ``d_ptr``, ``g_ptr`` and ``r_ptr`` words like x, ``STEPS`` = K_SPLIT / (TK * 4)
    and ``P2`` the power of two at or above it)."""
    BN: gl.constexpr = R * TN * W
    BKW: gl.constexpr = TK * 4  # words of K per step
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    rn, rn_loc, w_ptrs, xoff, n_steps, zeros = _row_tiles(w_ptr, N, KW, K_SPLIT, R, TN, TK, W, EVEN_N)

    acc = zeros
    acc_up = acc
    w = gl.load(w_ptrs)
    u = w
    if GLU:
        u = gl.load(w_ptrs + UP)
    if NORM:  # after the first weight loads, so that it hides under them
        LX: gl.constexpr = gl.SliceLayout(0, gl.BlockedLayout([R, 1, 4], [TN, TK, 1], [W, 1, 1], [2, 1, 0]))
        xs = normed_slice(x_ptr, d_ptr, g_ptr, r_ptr, eps, K, KW, pid_k * K_SPLIT, STEPS, P2, TK, W, HAS_DELTA, False)
    for i in range(n_steps):
        step = gl.minimum(i + 1, n_steps - 1) * BKW
        w_next = gl.load(w_ptrs + step)
        wl, wh = _bf16x2_to_f32(w)
        if NORM:
            xl, xh = _bf16x2_to_f32(xs.index(i).load(LX))
        else:
            xl, xh = _bf16x2_to_f32(gl.load(x_ptr + xoff + i * BKW))
        acc = gl.fma(wl, xl[None, :, :], acc)
        acc = gl.fma(wh, xh[None, :, :], acc)
        w = w_next
        if GLU:
            u_next = gl.load(w_ptrs + UP + step)
            ul, uh = _bf16x2_to_f32(u)
            acc_up = gl.fma(ul, xl[None, :, :], acc_up)
            acc_up = gl.fma(uh, xh[None, :, :], acc_up)
            u = u_next

    v = gl.sum(gl.sum(acc, axis=2), axis=1)
    if GLU:
        gate = v.to(gl.bfloat16).to(gl.float32)
        up = gl.sum(gl.sum(acc_up, axis=2), axis=1).to(gl.bfloat16).to(gl.float32)
        v = gate / (1.0 + gl.exp(-gate)) * up
    one = 1.0
    if SPLIT_K == 1:
        _stores(v, v, pid_n, pid_k, rn, rn_loc, one, y_ptr, ws_ptr, N, 0, SPLIT_K, 1, BN, EVEN_N, 0)
    else:
        _stores(v, v, pid_n, pid_k, rn, rn_loc, one, y_ptr, ws_ptr, N, 0, SPLIT_K, 1, BN, EVEN_N, 1)
        gl.thread_barrier()
        arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            _stores(v, v, pid_n, pid_k, rn, rn_loc, one, y_ptr, ws_ptr, N, 0, SPLIT_K, 1, BN, EVEN_N, 2)
            gl.atomic_xchg(cnt_ptr + pid_n, 0)
