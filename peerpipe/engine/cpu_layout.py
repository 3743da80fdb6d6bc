"""fp32 matrices laid out for a CPU's one-row products.

A decode step multiplies one row by every matrix. Stored row by row (``[out, in]``, as a
checkpoint holds it), PyTorch's CPU kernel takes a dot product per output, which short rows make
slow; stored column by column (the transpose made contiguous, still the same ``[out, in]``
tensor to every caller) the same ``F.linear`` adds up scaled rows of the transpose instead. On a
2-core VM, 2 threads: a 2048x384 gate|up went from 9.5 to 17-20 GB/s, a 6144x768 one from 8-17
to 22, a 32000x384 head from 11 to 19. Matrices no wider than twice their length gain little or
lose (a 384x1024 down projection 15 -> 14), bf16 and fp16 ones lose, and two to sixteen rows
run 10-25% slower on the wide ones: only fp32 matrices at least ``WIDE`` times as wide as long
are laid out so. The values, and every product's result up to the order of its sums, stay.
Every CPU stage is laid out alike, whole model or part: a room's answers equal one node's bit
for bit only when its stages sum in the same order.
"""

from __future__ import annotations

import torch
from torch import nn

WIDE = 2  # laid out by columns: out >= WIDE * in


def wide(w: torch.Tensor) -> bool:
    """Whether ``w`` ``[out, in]`` multiplies one row faster stored by columns on a CPU."""
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and w.shape[0] >= WIDE * w.shape[1]


def by_columns(w: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)


def lay_out(linears: list[nn.Linear], tied: tuple[nn.Embedding, nn.Linear] | None = None) -> int:
    """Store each wide plain matrix of ``linears`` by columns, in place (one matrix's extra copy at
    a time); ``tied``: an embedding and the head that shares its matrix, which keep sharing it.
    Returns how many matrices were laid out."""
    count = 0
    for lin in linears:
        w = lin.weight
        if not w.numel() or not wide(w) or not w.is_contiguous():
            continue  # quantized (emptied), narrow, half precision, or laid out already
        embed = tied[0] if tied is not None and lin is tied[1] and tied[0].weight is w else None
        lin.weight = by_columns(w)
        if embed is not None:
            embed.weight = lin.weight
        count += 1
    return count
