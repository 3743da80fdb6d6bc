"""int8 weight-only products of one or two rows on CUDA cores (Gluon, Triton's explicit-layout
language), for decode steps: ``y[M, N] = x[M, K] @ (q[N, K] * scale[N, None]).T``.

A decode step's time is the weight bytes it reads. Each thread loads 16 contiguous bytes of a
weight row as four int32 words (Triton's int8 loads unpack and repack bytes, about three
instructions a byte), turns each byte into an exact fp32 with two integer permutes and one
subtraction (the byte, offset by 128, becomes the low mantissa of 2**23), and multiplies it by
x loaded straight into the layout the product needs, so nothing goes through shared memory. A
thread sums its products in registers; threads are summed once, after the K loop. The next
tile's loads are issued before the current one is multiplied.

Split-K (``SPLIT_K`` programs along K, for matrices too short to fill the GPU): each program
writes its fp32 partial sums to a workspace, and the last to arrive at an output block (an
atomic counter, which it resets) adds them up and writes the output.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from peerpipe.engine.norm_gluon import _bf16x4_to_f32, normed_slice


@gluon.jit
def _bytes_to_f32(w):  # type: ignore[no-untyped-def]
    """int32 words of 4 int8 -> 4 fp32 tensors, byte j of each word in the j-th. 0x4B000000 is
    2**23: a byte b + 128 in its low mantissa bits is 2**23 + b + 128, exactly."""
    return gl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t;
        xor.b32 t, $4, 0x80808080;
        prmt.b32 $0, t, 0x4B000000, 0x7650;
        prmt.b32 $1, t, 0x4B000000, 0x7651;
        prmt.b32 $2, t, 0x4B000000, 0x7652;
        prmt.b32 $3, t, 0x4B000000, 0x7653;
        sub.f32 $0, $0, 0f4B000080;
        sub.f32 $1, $1, 0f4B000080;
        sub.f32 $2, $2, 0f4B000080;
        sub.f32 $3, $3, 0f4B000080;
        }
        """,
        constraints="=r,=r,=r,=r,r",
        args=[w],
        dtype=(gl.float32, gl.float32, gl.float32, gl.float32),
        is_pure=True,
        pack=1,
    )


@gluon.jit
def after_previous(PDL: gl.constexpr):  # type: ignore[no-untyped-def]
    """With ``PDL`` (the kernel launched as a programmatic dependent, int8_gluon.overlaps): wait
    until the kernel before has finished and its writes are visible, then let the next one
    launch. Everything before this call may read only what no kernel of the step writes (the
    weights), and nothing before it may be written."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; griddepcontrol.launch_dependents; // $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _row(f0, f1, f2, f3, xq, acc):  # type: ignore[no-untyped-def]
    x0, x1, x2, x3 = _bf16x4_to_f32(xq)
    acc = gl.fma(f0, x0[None, :, :], acc)
    acc = gl.fma(f1, x1[None, :, :], acc)
    acc = gl.fma(f2, x2[None, :, :], acc)
    return gl.fma(f3, x3[None, :, :], acc)


@gluon.jit
def _store(v, m, pid_n, pid_k, rn, rn_loc, scale, y_ptr, ws_ptr, N, stride_y, SPLIT_K,  # type: ignore[no-untyped-def]
           MR: gl.constexpr, BN: gl.constexpr, EVEN_N: gl.constexpr, PHASE: gl.constexpr):
    """PHASE 0: the output row; 1: this program's partial sums; 2: the sum of every partial."""
    if PHASE == 1:
        gl.store(ws_ptr + ((pid_n * SPLIT_K + pid_k) * MR + m) * BN + rn_loc, v)
    else:
        if PHASE == 2:
            v = v * 0.0
            for s in range(SPLIT_K):
                v += gl.load(ws_ptr + ((pid_n * SPLIT_K + s) * MR + m) * BN + rn_loc, cache_modifier=".cg")
        out = (v * scale).to(y_ptr.dtype.element_ty)
        if EVEN_N:
            gl.store(y_ptr + m * stride_y + rn, out)
        else:
            gl.store(y_ptr + m * stride_y + rn, out, mask=rn < N)


@gluon.jit
def _stores(v0, v1, pid_n, pid_k, rn, rn_loc, scale, y_ptr, ws_ptr, N, stride_y, SPLIT_K,  # type: ignore[no-untyped-def]
            MR: gl.constexpr, BN: gl.constexpr, EVEN_N: gl.constexpr, PHASE: gl.constexpr):
    _store(v0, 0, pid_n, pid_k, rn, rn_loc, scale, y_ptr, ws_ptr, N, stride_y, SPLIT_K, MR, BN, EVEN_N, PHASE)
    if MR > 1:
        _store(v1, 1, pid_n, pid_k, rn, rn_loc, scale, y_ptr, ws_ptr, N, stride_y, SPLIT_K, MR, BN, EVEN_N, PHASE)


@gluon.jit
def _row_tiles(w_ptr, N, KW, K_SPLIT, R: gl.constexpr, TN: gl.constexpr, TK: gl.constexpr,  # type: ignore[no-untyped-def]
               W: gl.constexpr, EVEN_N: gl.constexpr):
    """What both one-row kernels (this and bf16_gluon_fma.py) start from: this program's output
    rows (``rn``, and ``rn_loc`` within the block), its first step's weight words ``[BN, TK, 4]``
    (``w_ptr`` as int32), the offsets of x's words for them ``[TK, 4]``, the steps along K, and a
    zero accumulator in the weights' layout."""
    L3: gl.constexpr = gl.BlockedLayout([R, 1, 4], [TN, TK, 1], [W, 1, 1], [2, 1, 0])
    LA: gl.constexpr = gl.SliceLayout(2, L3)  # [BN, TK]
    LX: gl.constexpr = gl.SliceLayout(0, L3)  # [TK, 4]
    BN: gl.constexpr = R * TN * W
    pid_n = gl.program_id(0)
    k0 = gl.program_id(1) * K_SPLIT

    rn_loc = gl.arange(0, BN, layout=gl.SliceLayout(1, LA))
    rn = pid_n * BN + rn_loc
    if EVEN_N:
        w_rows = rn
    else:
        w_rows = gl.minimum(rn, N - 1)  # rows past N read the last one: loads stay unmasked, 16 bytes wide
    rt = gl.arange(0, TK, layout=gl.SliceLayout(0, LA))
    re = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    n3 = gl.expand_dims(gl.expand_dims(w_rows, 1), 2)
    t3 = gl.expand_dims(gl.expand_dims(rt, 0), 2)
    e3 = gl.expand_dims(gl.expand_dims(re, 0), 1)
    w_ptrs = w_ptr + n3.to(gl.int64) * KW + (k0 + t3 * 4 + e3)
    xt = gl.arange(0, TK, layout=gl.SliceLayout(1, LX))
    xe = gl.arange(0, 4, layout=gl.SliceLayout(0, LX))
    xoff = k0 + gl.expand_dims(xt, 1) * 4 + gl.expand_dims(xe, 0)
    return rn, rn_loc, w_ptrs, xoff, K_SPLIT // (TK * 4), gl.zeros([BN, TK, 4], gl.float32, L3)


@gluon.jit
def fma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr, N, KW, K_SPLIT, stride_x, stride_y, SPLIT_K,  # type: ignore[no-untyped-def]
               UP, d_ptr, g_ptr, r_ptr, eps, K, MR: gl.constexpr, R: gl.constexpr, TN: gl.constexpr,
               TK: gl.constexpr, W: gl.constexpr, EVEN_N: gl.constexpr, GLU: gl.constexpr, NORM: gl.constexpr,
               HAS_DELTA: gl.constexpr, STEPS: gl.constexpr, P2: gl.constexpr, PDL: gl.constexpr):
    """``x_ptr``: x as int64 ``[MR, K/4]`` (``stride_x`` in int64); ``w_ptr``: q as int32 ``[N, KW]``
    (KW = K/4); ``K_SPLIT``: words of K per program along K. Each thread holds R rows of 16 bytes;
    a warp is TN x TK threads; W warps along N. With ``GLU`` (one row, no split) q is a fused
    gate|up ``[2N, KW]`` whose up rows start ``UP`` words in, and y is silu(gate) * up: gate and
    up rounded to bf16 first, as their product rounds them, then rounded once more at the end, as
    a compiled layer's fused kernel does. With ``NORM`` (one row), x is h and the product takes
    g * norm(h + d) (norm_gluon.py; ``d_ptr``, ``g_ptr`` and ``r_ptr`` words like x, ``STEPS`` =
    K_SPLIT / (TK * 4) and ``P2`` the power of two at or above it)."""
    BN: gl.constexpr = R * TN * W
    BKW: gl.constexpr = TK * 4  # words of K per step
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    rn, rn_loc, w_ptrs, xoff, n_steps, zeros = _row_tiles(w_ptr, N, KW, K_SPLIT, R, TN, TK, W, EVEN_N)

    a0 = zeros
    a1 = a0
    w = gl.load(w_ptrs)
    u = w
    if GLU:
        u = gl.load(w_ptrs + UP)
    after_previous(PDL)  # the first weight loads fly while the kernel before ends
    if NORM:  # after the first weight loads, so that it hides under them
        LX: gl.constexpr = gl.SliceLayout(0, gl.BlockedLayout([R, 1, 4], [TN, TK, 1], [W, 1, 1], [2, 1, 0]))
        xs = normed_slice(x_ptr, d_ptr, g_ptr, r_ptr, eps, K, KW, pid_k * K_SPLIT, STEPS, P2, TK, W, HAS_DELTA, True)
    for i in range(n_steps):
        step = gl.minimum(i + 1, n_steps - 1) * BKW
        w_next = gl.load(w_ptrs + step)
        if NORM:
            xq = xs.index(i).load(LX)
        else:
            xq = gl.load(x_ptr + xoff + i * BKW)
        f0, f1, f2, f3 = _bytes_to_f32(w)
        a0 = _row(f0, f1, f2, f3, xq, a0)
        if MR > 1:
            a1 = _row(f0, f1, f2, f3, gl.load(x_ptr + xoff + i * BKW + stride_x), a1)
        w = w_next
        if GLU:  # a1 sums the up rows (one row of x)
            u_next = gl.load(w_ptrs + UP + step)
            f0, f1, f2, f3 = _bytes_to_f32(u)
            a1 = _row(f0, f1, f2, f3, xq, a1)
            u = u_next

    if EVEN_N:
        scale = gl.load(s_ptr + rn).to(gl.float32)
    else:
        scale = gl.load(s_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)
    v0 = gl.sum(gl.sum(a0, axis=2), axis=1)
    if GLU:
        if EVEN_N:
            scale_up = gl.load(s_ptr + N + rn).to(gl.float32)
        else:
            scale_up = gl.load(s_ptr + N + rn, mask=rn < N, other=0.0).to(gl.float32)
        gate = (v0 * scale).to(gl.bfloat16).to(gl.float32)
        up = (gl.sum(gl.sum(a1, axis=2), axis=1) * scale_up).to(gl.bfloat16).to(gl.float32)
        v0 = gate / (1.0 + gl.exp(-gate)) * up
        scale = scale * 0.0 + 1.0  # scaled already
    v1 = v0
    if MR > 1:
        v1 = gl.sum(gl.sum(a1, axis=2), axis=1)
    if SPLIT_K == 1:
        _stores(v0, v1, pid_n, pid_k, rn, rn_loc, scale, y_ptr, ws_ptr, N, stride_y, SPLIT_K, MR, BN, EVEN_N, 0)
    else:
        _stores(v0, v1, pid_n, pid_k, rn, rn_loc, scale, y_ptr, ws_ptr, N, stride_y, SPLIT_K, MR, BN, EVEN_N, 1)
        gl.thread_barrier()
        arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            _stores(v0, v1, pid_n, pid_k, rn, rn_loc, scale, y_ptr, ws_ptr, N, stride_y, SPLIT_K, MR, BN, EVEN_N, 2)
            gl.atomic_xchg(cnt_ptr + pid_n, 0)
