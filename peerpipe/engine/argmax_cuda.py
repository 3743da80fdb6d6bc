"""The greedy token on CUDA in one kernel (Triton): ``x.argmax(-1)`` of a ``[B, V]`` row of logits.

torch reduces a row in one thread block (26 to 36 µs for a 128k vocabulary on an H200); its
two-pass form (per-chunk maxima, then the best chunk; sampling.row_argmax) takes four kernels and
about 13 µs. Here programs of 4096 logits each find their first maximum, and the last to finish
(an atomic counter, which it resets) picks the first best program. Values are compared as
order-preserving integers with NaN above everything, so the index is torch's: the first NaN,
else the first maximum.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from peerpipe.engine import int8_cuda

CHUNK = 4096
MAX_PROGRAMS = 1024  # a row of up to 4M logits
_STATE: dict[tuple[torch.device, int], tuple[Tensor, Tensor]] = {}


@functools.cache
def _kernel():  # type: ignore[no-untyped-def]
    import triton
    import triton.language as tl

    @triton.jit
    def argmax(x_ptr, out_ptr, ws_ptr, cnt_ptr, V, stride, P, CHUNK: tl.constexpr,  # type: ignore[no-untyped-def]
               P_PAD: tl.constexpr):
        b = tl.program_id(0)
        p = tl.program_id(1)
        offs = p * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(x_ptr + b * stride + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with 0.0, as torch compares them
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # floats in order as int32
        key = tl.where(x != x, 0x7FFFFFFF, key)  # NaN wins, as in torch.argmax
        best = tl.max(key, 0)
        first = tl.min(tl.where(key == best, offs, V), 0)
        tl.store(ws_ptr + (b * P_PAD + p) * 2, best)
        tl.store(ws_ptr + (b * P_PAD + p) * 2 + 1, first)
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel", scope="gpu") == P - 1:
            rp = tl.arange(0, P_PAD)
            keys = tl.load(ws_ptr + (b * P_PAD + rp) * 2, mask=rp < P, other=-0x7FFFFFFF - 1, cache_modifier=".cg")
            firsts = tl.load(ws_ptr + (b * P_PAD + rp) * 2 + 1, mask=rp < P, other=V, cache_modifier=".cg")
            top = tl.max(keys, 0)
            tl.store(out_ptr + b, tl.min(tl.where(keys == top, firsts, V), 0).to(tl.int64))
            tl.atomic_xchg(cnt_ptr + b, 0)

    return argmax


def fits(x: Tensor) -> bool:
    """Whether the kernel takes ``x``: a CUDA ``[B, V]`` of floats with unit stride along V, where
    Triton is installed."""
    return (
        x.is_cuda and x.dim() == 2 and x.stride(-1) == 1 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and x.shape[1] <= CHUNK * MAX_PROGRAMS and int8_cuda.available()
    )


def argmax(x: Tensor) -> Tensor:
    """``x.argmax(-1)`` for ``x`` ``[B, V]`` (``fits``): int64 ``[B]``."""
    b, v = x.shape
    programs = -(-v // CHUNK)
    pad = 1 << (programs - 1).bit_length()
    workspace, counters = _state(x.device, b * pad * 2, b)
    out = torch.empty(b, dtype=torch.long, device=x.device)
    _kernel()[(b, programs)](x, out, workspace, counters, v, x.stride(0), programs, CHUNK=CHUNK, P_PAD=pad,
                             num_warps=4)
    return out


def _state(device: torch.device, words: int, rows: int) -> tuple[Tensor, Tensor]:
    """Per device and stream (engines of one process may sample on several), a workspace of at
    least ``words`` int32 and ``rows`` zeroed counters."""
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    held = _STATE.get(key)
    if held is None or held[0].numel() < words or held[1].numel() < rows:
        held = (torch.empty(max(words, 1 << 16), dtype=torch.int32, device=device),
                torch.zeros(max(rows, 256), dtype=torch.int32, device=device))
        _STATE[key] = held
    return held
