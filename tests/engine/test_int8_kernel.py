"""The CUDA int8 decode kernel (engine/int8_cuda.py), run by Triton's interpreter on the CPU where
Triton is installed (on a GPU machine, for real): the product of the dequantized matrix."""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # read when Triton is imported: kernels run in NumPy

from peerpipe.engine import int8_cuda
from peerpipe.engine.quant import quantize

pytestmark = pytest.mark.skipif(not int8_cuda.available(), reason="Triton is not installed")


@pytest.mark.parametrize(("rows", "width"), [(1, 320), (3, 256), (8, 320)])  # 256: blocks tile the width
def test_the_kernel_multiplies_by_the_dequantized_matrix(rows: int, width: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton was imported before its interpreter could be asked for")
    w = quantize(torch.randn(100, width), "int8")
    q, scale = w.q.to(device), w.scale.to(device)
    x = torch.randn(rows, width, device=device)
    got = int8_cuda.int8_gemv(x, q, scale, (8, 128, 4))
    want = x @ (q.float() * scale.unsqueeze(1)).T
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at most 8 rows"):
        int8_cuda.int8_gemv(torch.randn(9, width, device=device), q, scale)

