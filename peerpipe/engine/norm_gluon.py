"""A layer's RMSNorm as the prologue of the one-row product that follows it (Gluon), for decode
steps: ``r = h + d`` (the residual stream with the last block's output added) and
``n = g * norm(r)``, then ``y = W @ n`` in the same kernel.

In a graphed decode step of a 1B model the norms' own kernels (twice a layer, each with its
residual add) took about 3 µs each with their launch gaps, for 2048 numbers. Here every program
of the product sums the squares of the whole row itself (a few KB, from L2 then L1: it was just
written), normalizes the slice of K it multiplies into shared memory once, and reads x from
there. Its first weight loads are issued before this prologue, so it hides under their latency.
Program (0, 0) writes ``r``, which the next residual add reads.

Rounding follows HF's Llama (and a compiled layer's fused norm): ``r`` rounded to bf16, the
normalized row rounded to bf16 before the weight, the product with ``g`` rounded again; the sum
of squares and the reciprocal root in fp32.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _bf16x2_to_f32(w):  # type: ignore[no-untyped-def]
    """int32 words of two bf16 -> 2 fp32 tensors: the low half, then the high half."""
    return gl.inline_asm_elementwise(
        asm="""
        shl.b32 $0, $2, 16;
        and.b32 $1, $2, 0xFFFF0000;
        """,
        constraints="=r,=r,r",
        args=[w],
        dtype=(gl.float32, gl.float32),
        is_pure=True,
        pack=1,
    )


@gluon.jit
def _pack_pair(lo, hi):  # type: ignore[no-untyped-def]
    """2 fp32 tensors -> int32 words of two bf16 (round to nearest even)."""
    return gl.inline_asm_elementwise(
        asm="cvt.rn.bf16x2.f32 $0, $2, $1;",
        constraints="=r,r,r",
        args=[lo, hi],
        dtype=gl.int32,
        is_pure=True,
        pack=1,
    )


@gluon.jit
def _bf16x4_to_f32(w):  # type: ignore[no-untyped-def]
    """int64 words of four bf16 -> 4 fp32 tensors, in memory order."""
    return gl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 lo, hi;
        mov.b64 {lo, hi}, $4;
        shl.b32 $0, lo, 16;
        and.b32 $1, lo, 0xFFFF0000;
        shl.b32 $2, hi, 16;
        and.b32 $3, hi, 0xFFFF0000;
        }
        """,
        constraints="=r,=r,=r,=r,l",
        args=[w],
        dtype=(gl.float32, gl.float32, gl.float32, gl.float32),
        is_pure=True,
        pack=1,
    )


@gluon.jit
def _pack_quad(a, b, c, d):  # type: ignore[no-untyped-def]
    """4 fp32 tensors -> int64 words of four bf16, in memory order (round to nearest even)."""
    return gl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 lo, hi;
        cvt.rn.bf16x2.f32 lo, $2, $1;
        cvt.rn.bf16x2.f32 hi, $4, $3;
        mov.b64 $0, {lo, hi};
        }
        """,
        constraints="=l,r,r,r,r",
        args=[a, b, c, d],
        dtype=gl.int64,
        is_pure=True,
        pack=1,
    )


@gluon.jit
def _bf16(v):  # type: ignore[no-untyped-def]
    return v.to(gl.bfloat16).to(gl.float32)


@gluon.jit
def _stream(h, d, HAS_DELTA: gl.constexpr):  # type: ignore[no-untyped-def]
    """The residual stream: h + d rounded to bf16 as the separate add rounds it; h without d."""
    if HAS_DELTA:
        h = _bf16(h + d)
    return h


@gluon.jit
def _residual(hw, dw, HAS_DELTA: gl.constexpr, QUAD: gl.constexpr):  # type: ignore[no-untyped-def]
    """Words of r = h + d and the sum of r's squares in each word."""
    if QUAD:
        h0, h1, h2, h3 = _bf16x4_to_f32(hw)
        d0, d1, d2, d3 = _bf16x4_to_f32(dw)
        r0, r1, r2, r3 = _stream(h0, d0, HAS_DELTA), _stream(h1, d1, HAS_DELTA), _stream(h2, d2, HAS_DELTA), _stream(h3, d3, HAS_DELTA)
        return _pack_quad(r0, r1, r2, r3), r0 * r0 + r1 * r1 + r2 * r2 + r3 * r3
    else:
        h0, h1 = _bf16x2_to_f32(hw)
        d0, d1 = _bf16x2_to_f32(dw)
        r0, r1 = _stream(h0, d0, HAS_DELTA), _stream(h1, d1, HAS_DELTA)
        return _pack_pair(r0, r1), r0 * r0 + r1 * r1


@gluon.jit
def _scaled(r, g, rs):  # type: ignore[no-untyped-def]
    return g * _bf16(r * rs)


@gluon.jit
def _normalized(hw, dw, gw, rs, HAS_DELTA: gl.constexpr, QUAD: gl.constexpr):  # type: ignore[no-untyped-def]
    """Words of g * norm(h + d), given the reciprocal root ``rs``."""
    if QUAD:
        h0, h1, h2, h3 = _bf16x4_to_f32(hw)
        d0, d1, d2, d3 = _bf16x4_to_f32(dw)
        g0, g1, g2, g3 = _bf16x4_to_f32(gw)
        return _pack_quad(_scaled(_stream(h0, d0, HAS_DELTA), g0, rs), _scaled(_stream(h1, d1, HAS_DELTA), g1, rs),
                          _scaled(_stream(h2, d2, HAS_DELTA), g2, rs), _scaled(_stream(h3, d3, HAS_DELTA), g3, rs))
    else:
        h0, h1 = _bf16x2_to_f32(hw)
        d0, d1 = _bf16x2_to_f32(dw)
        g0, g1 = _bf16x2_to_f32(gw)
        return _pack_pair(_scaled(_stream(h0, d0, HAS_DELTA), g0, rs), _scaled(_stream(h1, d1, HAS_DELTA), g1, rs))


@gluon.jit
def normed_slice(h_ptr, d_ptr, g_ptr, r_ptr, eps, K, KW, k0,  # type: ignore[no-untyped-def]
                 STEPS: gl.constexpr, P2: gl.constexpr, TK: gl.constexpr, W: gl.constexpr,
                 HAS_DELTA: gl.constexpr, QUAD: gl.constexpr):
    """Shared memory ``[P2, TK, 4]`` of words (int64 of four bf16 with ``QUAD``, else int32 of
    two) holding g * norm(h + d) for this program's ``STEPS`` steps of ``TK * 4`` words from
    word ``k0``; ``K`` numbers (``KW`` words) a row. Program (0, 0) also writes ``r = h + d``
    (with ``HAS_DELTA``; without it r is h)."""
    L1: gl.constexpr = gl.BlockedLayout([4], [32], [W], [0])
    CH: gl.constexpr = 4 * 32 * W
    offs = gl.arange(0, CH, layout=L1)
    first = (gl.program_id(0) == 0) & (gl.program_id(1) == 0)
    ss = gl.zeros([CH], gl.float32, L1)
    for j in range(0, KW, CH):
        o = j + offs
        inside = o < KW
        hw = gl.load(h_ptr + o, mask=inside, other=0)
        dw = hw
        if HAS_DELTA:
            dw = gl.load(d_ptr + o, mask=inside, other=0)
        rw, sq = _residual(hw, dw, HAS_DELTA, QUAD)
        ss += sq
        if HAS_DELTA:
            gl.store(r_ptr + o, rw, mask=inside & first)
    rs = gl.rsqrt(gl.sum(ss, axis=0) / K + eps)

    # Stored in a layout with few copies of each word, read back in the product's layout.
    LN: gl.constexpr = gl.BlockedLayout([1, 1], [8, 4], [W, 1], [1, 0])
    SL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])  # of one step's [TK, 4]
    xs = gl.allocate_shared_memory(h_ptr.dtype.element_ty, [P2, TK, 4], SL)
    t = gl.arange(0, TK, layout=gl.SliceLayout(1, LN))
    e = gl.arange(0, 4, layout=gl.SliceLayout(0, LN))
    tile = k0 + gl.expand_dims(t, 1) * 4 + gl.expand_dims(e, 0)
    for i in range(STEPS):
        o = tile + i * (TK * 4)
        hw = gl.load(h_ptr + o)
        dw = hw
        if HAS_DELTA:
            dw = gl.load(d_ptr + o)
        xs.index(i).store(_normalized(hw, dw, gl.load(g_ptr + o), rs, HAS_DELTA, QUAD))
    gl.thread_barrier()
    return xs
