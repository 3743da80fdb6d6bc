"""int8 weight-only products of up to 8 rows on tensor cores (Gluon), for decode steps:
``y[M, N] = x[M, K] @ (q[N, K] * scale[N, None]).T``.

With more than two rows, CUDA cores turn compute-bound (M multiply-adds per weight byte); an
``mma.sync m16n8k16`` takes 16 output rows of weights as its A operand and x^T as its B operand,
whose 8 columns are the (up to 8) rows of x, so the time does not grow with M. The operands come
straight from 16-byte global loads into registers, no shared memory: each thread loads 16 bytes
of weight row g and of row g + 8 (g = lane / 4), and since a dot product may sum its k in any
order as long as A and B agree, thread tq = lane % 4 feeds the 4 bytes of word j to its fragment
positions of the j-th of 4 MMAs and loads x at the same 4 k (one int64 of 4 bf16).

int8 -> bf16 is exact, two bytes at a time: for a byte b = low7 - 128 * sign, the bf16 bits
0x4300 | low7 are 128 + low7 and 0x4300 | (b & 0x80) are 128 + 128 * sign, so one bf16x2
subtraction gives b. Split-K works as in int8_gluon_fma.py.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


def _mma_asm() -> str:
    body = ["{", ".reg .b32 t, v, c, a0, a1, a2, a3, b0, b1, lo, hi;",
            "mov.f32 $0, $16;", "mov.f32 $1, $17;", "mov.f32 $2, $18;", "mov.f32 $3, $19;"]

    def pair(dst: str, src: str) -> list[str]:  # bytes 0 and 2 of src -> bf16x2 (lop3 0xEA: (a & b) | c)
        return [f"lop3.b32 v, {src}, 0x007F007F, 0x43004300, 0xEA;",
                f"lop3.b32 c, {src}, 0x00800080, 0x43004300, 0xEA;",
                f"sub.rn.bf16x2 {dst}, v, c;"]

    for j in range(4):  # word j of rows g and g + 8: bytes (0, 2) and (1, 3) pair up, x likewise
        body += pair("a0", f"${4 + j}")
        body.append(f"shr.b32 t, ${4 + j}, 8;")
        body += pair("a2", "t")
        body += pair("a1", f"${8 + j}")
        body.append(f"shr.b32 t, ${8 + j}, 8;")
        body += pair("a3", "t")
        body.append(f"mov.b64 {{lo, hi}}, ${12 + j};")
        body.append("prmt.b32 b0, lo, hi, 0x5410;")
        body.append("prmt.b32 b1, lo, hi, 0x7632;")
        body.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {a0, a1, a2, a3}, "
                    "{b0, b1}, {$0, $1, $2, $3};")
    body.append("}")
    return "\n".join(body)


MMA_ASM = gl.constexpr(_mma_asm())
MMA_CONSTRAINTS = gl.constexpr("=f,=f,=f,=f," + ",".join(["r"] * 8 + ["l"] * 4 + ["f"] * 4))


@gluon.jit
def _mma4(wa, wb, xq, acc):  # type: ignore[no-untyped-def]
    # Four consecutive registers a call (pack=4): the 4 words of one 16-byte load. mma.sync is
    # warp-wide, which holds here: every lane runs the same straight-line code.
    return gl.inline_asm_elementwise(
        asm=MMA_ASM, constraints=MMA_CONSTRAINTS, args=[wa, wb, xq, acc], dtype=gl.float32, is_pure=True, pack=4)


@gluon.jit(do_not_specialize=["M"])
def mma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, KW, K_SPLIT, stride_x, stride_y, SPLIT_K,  # type: ignore[no-untyped-def]
               WN: gl.constexpr, WK: gl.constexpr, RKB: gl.constexpr, EVEN_N: gl.constexpr):
    """``x_ptr``: x as int64 ``[M, K/4]``; ``w_ptr``: q as int32 ``[N, KW]``; ``K_SPLIT``: words of
    K per program along K. Tensors are [tile of 16 rows, k-block of 64 bytes, g, tq, word]; WN warps
    along tiles, WK along k-blocks (summed across warps at the end), RKB k-blocks per warp."""
    L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 4], [1, 1, 8, 4, 1], [WN, WK, 1, 1, 1], [4, 3, 2, 1, 0])
    S4: gl.constexpr = gl.SliceLayout(4, L)
    S43: gl.constexpr = gl.SliceLayout(3, S4)
    S432: gl.constexpr = gl.SliceLayout(2, S43)
    T: gl.constexpr = WN
    KB: gl.constexpr = WK * RKB
    STEPW: gl.constexpr = KB * 16  # words of K per step
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    k0 = pid_k * K_SPLIT
    n_steps = K_SPLIT // STEPW

    # Index tensors, each broadcastable to [T, KB, 8, 4, 4] in layout L.
    it = gl.arange(0, T, layout=gl.SliceLayout(1, S432))
    it = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(it, 1), 2), 3), 4)
    ikb = gl.arange(0, KB, layout=gl.SliceLayout(0, S432))
    ikb = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(ikb, 0), 2), 3), 4)
    ig = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, S43)))
    ig = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(ig, 0), 1), 3), 4)
    iq = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, S4))))
    iq = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(iq, 0), 1), 2), 4)
    ij = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L)))))
    ij = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(ij, 0), 1), 2), 3)

    row = (pid_n * T + it) * 16 + ig  # [T, 1, 8, 1, 1]
    if EVEN_N:
        row_a = row
        row_b = row + 8
    else:
        row_a = gl.minimum(row, N - 1)
        row_b = gl.minimum(row + 8, N - 1)
    kw = k0 + ikb * 16 + iq * 4 + ij  # [1, KB, 1, 4, 4] word offsets
    wa_ptrs = w_ptr + row_a.to(gl.int64) * KW + kw
    wb_ptrs = w_ptr + row_b.to(gl.int64) * KW + kw
    x_ptrs = x_ptr + ig * stride_x + kw  # [1, KB, 8, 4, 4]: column g of B is row g of x
    x_mask = (ig + kw * 0) < M

    acc = gl.zeros([T, KB, 8, 4, 4], gl.float32, L)
    wa = gl.load(wa_ptrs)
    wb = gl.load(wb_ptrs)
    xq = gl.load(x_ptrs, mask=x_mask, other=0)
    for i in range(n_steps):  # the next step's loads are issued before this step's MMAs
        nxt = gl.minimum(i + 1, n_steps - 1) * STEPW
        wa_n = gl.load(wa_ptrs + nxt)
        wb_n = gl.load(wb_ptrs + nxt)
        xq_n = gl.load(x_ptrs + nxt, mask=x_mask, other=0)
        xb, _ = gl.broadcast(xq, wa)
        acc = _mma4(wa, wb, xb, acc)
        wa = wa_n
        wb = wb_n
        xq = xq_n

    sums = gl.sum(acc, axis=1, keep_dims=True)  # [T, 1, 8, 4, 4]; across warps when WK > 1
    # Accumulator element (t, g, tq, d): output row t * 16 + g + 8 * (d >> 1), x row 2 * tq + (d & 1).
    n_out = row + 8 * (ij >> 1)
    m_out = 2 * iq + (ij & 1)
    if EVEN_N:
        omask = m_out < M
    else:
        omask = (m_out < M) & (n_out < N)
    y_ptrs = y_ptr + m_out * stride_y + n_out
    if SPLIT_K == 1:
        scale = gl.load(s_ptr + gl.minimum(n_out, N - 1)).to(gl.float32)
        gl.store(y_ptrs, (sums * scale).to(y_ptr.dtype.element_ty), mask=omask)
    else:
        BLK: gl.constexpr = T * 16 * 8
        ws_off = (it * 16 + ig + 8 * (ij >> 1)) * 8 + m_out  # [T, 1, 8, 4, 4] in [0, BLK)
        gl.store(ws_ptr + (pid_n * SPLIT_K + pid_k) * BLK + ws_off, sums)
        gl.thread_barrier()
        arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = sums * 0.0
            for s in range(SPLIT_K):
                total += gl.load(ws_ptr + (pid_n * SPLIT_K + s) * BLK + ws_off, cache_modifier=".cg")
            scale = gl.load(s_ptr + gl.minimum(n_out, N - 1)).to(gl.float32)
            gl.store(y_ptrs, (total * scale).to(y_ptr.dtype.element_ty), mask=omask)
            gl.atomic_xchg(cnt_ptr + pid_n, 0)
