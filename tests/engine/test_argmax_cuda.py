"""The greedy token in one CUDA kernel (engine/argmax_cuda.py): torch.argmax's index, ties, NaN
and infinities included (skipped without a GPU and Triton)."""

from __future__ import annotations

import pytest
import torch

from peerpipe.engine import argmax_cuda
from peerpipe.engine.sampling import row_argmax


def test_rows_it_cannot_take_keep_torch() -> None:
    assert not argmax_cuda.fits(torch.randn(2, 100))  # a CPU tensor
    x = torch.randn(2, 50_000)
    assert torch.equal(row_argmax(x), x.argmax(-1))


def _runs() -> bool:
    return torch.cuda.is_available() and argmax_cuda.fits(torch.empty(1, 8, device="cuda"))


cuda_triton = pytest.mark.skipif(not _runs(), reason="needs CUDA and Triton")


@cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [128256, 151936, 32000, 4096, 5000, 50])
def test_the_kernel_picks_torchs_index(dtype: torch.dtype, vocab: int) -> None:
    torch.manual_seed(vocab)
    x = torch.randn(4, vocab, device="cuda").to(dtype)
    x[1, vocab // 3] = x[1, vocab - 1] = 100  # a tie: the first wins
    x[2] = float("-inf")  # nothing but -inf: index 0
    x[3] = x[3].round()  # many ties
    assert argmax_cuda.fits(x)
    for _ in range(3):  # the counters are reset for the next call
        assert torch.equal(argmax_cuda.argmax(x), x.argmax(-1))
    assert torch.equal(row_argmax(x[:, :vocab]), x.argmax(-1))


@cuda_triton
def test_nan_wins_and_signed_zeros_tie() -> None:
    x = -torch.rand(3, 9000, device="cuda") - 1
    x[0, 5000], x[0, 7000], x[0, 8000] = float("inf"), float("nan"), float("nan")
    x[1, 2], x[1, 3] = -0.0, 0.0
    x[2, 100] = float("inf")
    assert argmax_cuda.argmax(x).tolist() == x.argmax(-1).tolist() == [7000, 2, 100]
