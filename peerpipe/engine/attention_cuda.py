"""A decode step's attention on CUDA in one kernel (Triton): each KV head's group of query rows
against its cached keys and values, softmax and all.

Spelled out for torch.compile, one new token's attention was three kernels per layer (two cuBLAS
products around a softmax, 6.6 µs together for 256 cached positions of the 1B shape on an H200,
a tenth of a compiled step); SDPA's kernels, which graphs without compile replay, take 8 to 34 µs
from 256 to 2048 positions. Here one program per (session, KV head) and span of positions runs
the online softmax over blocks of 64 positions (two warps each); with few sessions the positions
split among up to 8 programs, and the last to finish (an atomic counter, as in int8_gluon.py's
split-K, sharing its workspace) merges their partial sums. Probabilities are rounded to the
model's dtype before they weigh the values, as flash attention does.

``decode_step`` is the same kernel fed a layer's unrotated q|k|v product: it rotates the query
and the new key, reads each row's slot and position (scattered slots in place, no gather; the
causal and sliding-window masks from the position), attends with the new key and value standing
in for their cache row, and stores them there. A graphed step's rotation, cache write, masks and
attention were six kernels or more; on an H200 the kernel takes about 7 µs at 256 positions
against 5 for attention alone, the price of moving the new row between layouts.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from peerpipe.engine import int8_gluon

BLOCK_L = 64
MAX_SPLITS = 8
TARGET_PROGRAMS = 128  # about the SMs of an H200; past it splitting only adds merging


@functools.cache
def _kernel():  # type: ignore[no-untyped-def]
    import triton
    import triton.language as tl

    @triton.jit
    def attend(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, ws_ptr, cnt_ptr, KV, L, L_SPLIT, scale,  # type: ignore[no-untyped-def]
               sqb, sqh, sqg, skb, skh, skl, svb, svh, svl, smb, sob, soh, sog,
               rope_ptr, srb, slot_ptr, pos_ptr, spb, new_off, WINDOW, FIRST_SLOT,
               SPLIT: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BL: tl.constexpr,
               NEW: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // KV
        h = bh % KV
        rg = tl.arange(0, G_PAD)
        rd = tl.arange(0, D)
        rl0 = tl.arange(0, BL)
        q_ptrs = q_ptr + b * sqb + h * sqh + rg[:, None] * sqg
        lo = sp * L_SPLIT
        hi = tl.minimum(lo + L_SPLIT, L)
        row = b.to(tl.int64)
        if NEW:
            pos = tl.load(pos_ptr + b * spb)
            if FIRST_SLOT >= 0:  # contiguous slots: no load for the keys' address to wait on
                row = FIRST_SLOT + row
            else:
                row = tl.load(slot_ptr + b)
            # Dimensions 2i and 2i+1 turn by angle i: cos, and sin signed for each one's place.
            # The factors are loaded twice, in the layouts of q and of a key row, rather than
            # moved between them through shared memory.
            turns = rope_ptr + b * srb + (rd // 2) * 2
            sign = tl.where(rd % 2 == 0, -1.0, 1.0)
            cos_q = tl.load(turns[None, :])
            sin_q = tl.load(turns[None, :] + 1) * sign[None, :]
            cos = tl.load(turns)
            sin = tl.load(turns + 1) * sign
        q = tl.load(q_ptrs + rd[None, :], mask=rg[:, None] < G, other=0.0)
        if NEW:
            # q|k|v of the new position in, unrotated: rotate q and the new key here in float32
            # as _apply_rope does, and store the key and value where the cache keeps them.
            q_pair = tl.load(q_ptrs + (rd ^ 1)[None, :], mask=rg[:, None] < G, other=0.0)
            q = (q.to(tl.float32) * cos_q + q_pair.to(tl.float32) * sin_q).to(q_ptr.dtype.element_ty)
            kv_new = q_ptr + b * sqb + new_off + h * D
            k_new = (tl.load(kv_new + rd).to(tl.float32) * cos
                     + tl.load(kv_new + (rd ^ 1)).to(tl.float32) * sin).to(k_ptr.dtype.element_ty)
            v_new = tl.load(kv_new + KV * D + rd)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        k_base = k_ptr + row * skb + h * skh
        v_base = v_ptr + row * svb + h * svh
        for start in range(lo, hi, BL):
            rl = start + rl0
            inside = rl < hi
            k = tl.load(k_base + rl[:, None] * skl + rd[None, :], mask=inside[:, None], other=0.0)
            if NEW:
                # The new key is stored after the loop (a branch here would hold the loads back).
                k = tl.where((rl == pos)[:, None], k_new[None, :], k)
            s = tl.dot(q, tl.trans(k)) * scale
            if NEW:
                seen = inside & (rl <= pos)
                if WINDOW > 0:
                    seen = seen & (rl > pos - WINDOW)
                s = tl.where(seen[None, :], s, float("-inf"))
            else:
                s += tl.load(m_ptr + b * smb + rl, mask=inside, other=float("-inf")).to(tl.float32)[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a span with every position masked
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + rl[:, None] * svl + rd[None, :], mask=inside[:, None], other=0.0)
            if NEW:
                v = tl.where((rl == pos)[:, None], v_new[None, :], v)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if NEW:
            if (pos >= lo) & (pos < hi):  # the one program whose span holds the new position
                tl.store(k_ptr + row * skb + h * skh + pos * skl + rd, k_new)
                tl.store(v_ptr + row * svb + h * svh + pos * svl + rd, v_new)
        o_ptrs = o_ptr + b * sob + h * soh + rg[:, None] * sog + rd[None, :]
        if SPLIT == 1:
            tl.store(o_ptrs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=rg[:, None] < G)
        else:
            # Partials [program, G_PAD, D + 2]: the sums, then the running max and the denominator.
            row = D + 2
            base = ws_ptr + (bh * SPLIT + sp) * G_PAD * row
            tl.store(base + rg[:, None] * row + rd[None, :], acc)
            tl.store(base + rg * row + D, m_i)
            tl.store(base + rg * row + D + 1, l_i)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:
                first = ws_ptr + bh * SPLIT * G_PAD * row
                top = tl.full([G_PAD], float("-inf"), tl.float32)
                for s_i in range(SPLIT):
                    top = tl.maximum(top, tl.load(first + s_i * G_PAD * row + rg * row + D, cache_modifier=".cg"))
                total = tl.zeros([G_PAD, D], tl.float32)
                denom = tl.zeros([G_PAD], tl.float32)
                for s_i in range(SPLIT):
                    part = first + s_i * G_PAD * row
                    weight = tl.exp(tl.load(part + rg * row + D, cache_modifier=".cg") - top)
                    denom += weight * tl.load(part + rg * row + D + 1, cache_modifier=".cg")
                    sums = tl.load(part + rg[:, None] * row + rd[None, :], cache_modifier=".cg")
                    total += weight[:, None] * sums
                tl.store(o_ptrs, (total / denom[:, None]).to(o_ptr.dtype.element_ty), mask=rg[:, None] < G)
                tl.atomic_xchg(cnt_ptr + bh, 0)

    return attend


_ready = False  # prepare() found a CUDA device and Triton
enabled = True  # bench/engine.py turns it off to time torch's attention in the same run


def prepare(device: torch.device) -> bool:
    """Turn the kernel on for this process if ``device`` can run it, and allocate the shared
    workspace (before any graph is captured). Returns whether it is on."""
    global _ready
    if device.type == "cuda":
        try:
            _kernel()
        except ImportError:  # no Triton
            return _ready
        int8_gluon.reserve(device)
        _ready = True
    return _ready


def _pad(g: int) -> int:
    return max(16, 1 << (g - 1).bit_length())  # tl.dot takes 16 rows or more


def splits(programs: int, length: int, g: int, d: int) -> int:
    """Programs along the positions: doubled while the GPU has room, each keeps a block or more,
    and the partial sums fit the workspace (the fastest on an H200 from 256 to 4096 positions)."""
    split = 1
    while (split < MAX_SPLITS and programs * split * 2 <= TARGET_PROGRAMS and length >= split * 2 * BLOCK_L
           and programs * split * 2 * _pad(g) * (d + 2) <= int8_gluon.WORKSPACE_FLOATS):
        split *= 2
    return split


def fits(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> bool:
    """Whether the kernel takes queries ``[B, KV, G, D]``, keys/values ``[B, KV, L, D]`` and an
    additive mask ``[B, 1, 1, L]``: half precision on CUDA, D a power of two from 16 to 256
    (plain checks only, so that a compiled layer decides while it is traced)."""
    d = q.shape[-1]
    return (
        q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and keys.dtype == q.dtype
        and 16 <= d <= 256 and d & (d - 1) == 0 and q.shape[2] <= 64 and keys.stride(-1) == 1
        and values.stride(-1) == 1 and mask.dim() == 4 and mask.shape[2] == 1 and mask.stride(-1) == 1
        and _ready and enabled
    )


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float,
                     tune: dict[str, int] | None = None) -> Tensor:
    """softmax(q keys^T * scale + mask) values for one new position: ``[B, KV, G, D]``.
    ``tune`` forces split, block, warps and stages (the sweep of bench/kernels.py)."""
    if torch.compiler.is_compiling():
        return _opaque(q, keys, values, mask, scale)
    b, kv, g, d = q.shape
    length = keys.shape[2]
    out = torch.empty_like(q)
    tune = tune or {}
    block = tune.get("block", BLOCK_L)
    split = tune.get("split") or splits(b * kv, length, g, d)
    span = -(-length // (split * block)) * block
    workspace, counters = int8_gluon.reserve(q.device)
    extra = {"num_stages": tune["stages"]} if "stages" in tune else {}
    _kernel()[(b * kv, split)](
        q, keys, values, mask, out, workspace, counters, kv, length, span, scale,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), mask.stride(0),
        out.stride(0), out.stride(1), out.stride(2), q, 0, q, q, 0, 0, 0, -1,
        SPLIT=split, G=g, G_PAD=_pad(g), D=d, BL=block, NEW=False, num_warps=tune.get("warps", 2), **extra,
    )
    return out


def takes(n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`decode_step` runs a layer of these heads on a cache of ``dtype`` on
    ``device``: half precision on CUDA, D a power of two from 16 to 256, at most 64 query heads a
    KV head."""
    d = head_dim
    return (
        _ready and enabled and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        and n_heads % n_kv_heads == 0 and n_heads // n_kv_heads <= 64 and 16 <= d <= 256 and d & (d - 1) == 0
    )


def fits_step(qkv: Tensor, rope: Tensor, store: Tensor, n_heads: int) -> bool:
    """Whether :func:`decode_step` takes this layer's q|k|v ``[B, 1, H + 2 KV, D]``, rotations
    ``[B, 1, 1, D/2]`` and cache ``store`` ``[slots, positions, 2, KV, D]`` (plain checks only)."""
    d, kv = qkv.shape[-1], store.shape[-2]
    return (
        takes(n_heads, kv, d, store.dtype, store.device) and qkv.dtype == store.dtype and qkv.is_cuda
        and rope.dtype == torch.complex64 and qkv.dim() == 4 and qkv.shape[1] == 1 and store.dim() == 5
        and qkv.shape[2] == n_heads + 2 * kv and qkv.stride(-1) == 1 and qkv.stride(-2) == d
        and store.is_contiguous() and rope.is_contiguous()
    )


def decode_step(qkv: Tensor, rope: Tensor, store: Tensor, slots: Tensor, positions: Tensor, kv_len: int,
                n_heads: int, window: int, scale: float, first_slot: int = -1) -> Tensor:
    """A decode step's attention from the layer's q|k|v product on: rotate the new query and key
    by ``rope`` (complex, ``[B, 1, 1, D/2]``), put the key and value into ``store`` at each row's
    slot and position, and attend to positions ``0 .. kv_len`` up to each row's own (and within
    ``window`` of it, when it is not 0); ``first_slot``, when not -1, says the slots are
    ``first_slot, first_slot + 1, ...``. Returns ``[B, KV, G, D]``. Three kernels of a layer
    (rotation, cache write, attention) in one, with no copy of scattered slots' keys."""
    cos_sin = torch.view_as_real(rope)  # a custom op takes no complex tensor under torch.compile
    return _opaque_step(qkv, cos_sin, store, slots, positions, kv_len, n_heads, window, scale, first_slot)


@torch.library.custom_op("peerpipe::decode_step", mutates_args=("store",))
def _opaque_step(qkv: Tensor, cos_sin: Tensor, store: Tensor, slots: Tensor, positions: Tensor, kv_len: int,
                 n_heads: int, window: int, scale: float, first_slot: int) -> Tensor:
    b, _, _, d = qkv.shape
    kv = store.shape[-2]
    g = n_heads // kv
    out = qkv.new_empty((b, kv, g, d))
    split = splits(b * kv, kv_len, g, d)
    span = -(-kv_len // (split * BLOCK_L)) * BLOCK_L
    workspace, counters = int8_gluon.reserve(qkv.device)
    keys, values = store.select(2, 0), store.select(2, 1)  # [slots, positions, KV, D]
    _kernel()[(b * kv, split)](
        qkv, keys, values, qkv, out, workspace, counters, kv, kv_len, span, scale,
        qkv.stride(0), g * d, d, keys.stride(0), keys.stride(2), keys.stride(1),
        values.stride(0), values.stride(2), values.stride(1), 0,
        out.stride(0), out.stride(1), out.stride(2),
        cos_sin, cos_sin.stride(0), slots, positions, positions.stride(0), n_heads * d, window, first_slot,
        SPLIT=split, G=g, G_PAD=_pad(g), D=d, BL=BLOCK_L, NEW=True, num_warps=2,
    )
    return out


@_opaque_step.register_fake
def _(qkv: Tensor, cos_sin: Tensor, store: Tensor, slots: Tensor, positions: Tensor, kv_len: int,
      n_heads: int, window: int, scale: float, first_slot: int) -> Tensor:
    kv = store.shape[-2]
    return qkv.new_empty((qkv.shape[0], kv, n_heads // kv, qkv.shape[-1]))


@torch.library.custom_op("peerpipe::decode_attention", mutates_args=())
def _opaque(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float) -> Tensor:
    return decode_attention(q, keys, values, mask, scale)


@_opaque.register_fake
def _(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float) -> Tensor:
    return torch.empty_like(q)
