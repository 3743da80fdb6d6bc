"""The Gluon int8 decode kernels (engine/int8_gluon*.py): their tile choice anywhere, their
products against the dequantized matrix on CUDA (skipped without a GPU and Triton's Gluon)."""

from __future__ import annotations

import pytest
import torch

from peerpipe.engine import int8_cuda, int8_gluon
from peerpipe.engine.quant import quantize

SHAPES_1B = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)]


@pytest.mark.parametrize(("n", "k"), [*SHAPES_1B, (1000, 192), (4096, 576), (640, 1536)])
@pytest.mark.parametrize("m", range(1, 9))
def test_every_choice_tiles_k_whole_and_keeps_its_partial_sums_in_the_workspace(n: int, k: int, m: int) -> None:
    kind, tiles, split = int8_gluon.choose(n, k, m)
    words = k // 4
    if kind == "fma":
        assert m <= 2 and tiles["TN"] * tiles["TK"] == 32  # one warp
        step, block = tiles["TK"] * 4, tiles["R"] * tiles["TN"] * tiles["W"]
        partials = block * m
    else:
        step, block = 16 * tiles["WK"] * tiles["RKB"], 16 * tiles["WN"]
        partials = block * 8
    assert words % (step * split) == 0 and words // (step * split) >= 1
    blocks = -(-n // block)
    if split > 1:
        assert blocks * split * partials <= int8_gluon.WORKSPACE_FLOATS and blocks <= int8_gluon.COUNTERS
    if (n, k) == (128256, 2048):
        assert kind == ("fma" if m == 1 else "mma")  # the head: tensor cores from two rows on


cuda_gluon = pytest.mark.skipif(
    not torch.cuda.is_available() or int8_gluon._kernels() is None, reason="needs CUDA and Triton's Gluon"
)


@cuda_gluon
@pytest.mark.parametrize(("n", "k"), [*SHAPES_1B, (1000, 192), (4096, 576), (640, 1536)])
def test_the_gluon_kernels_multiply_by_the_dequantized_matrix(n: int, k: int) -> None:
    torch.manual_seed(n + k)
    w = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), "int8")
    ref_w = w.q.double() * w.scale.double().unsqueeze(1)
    for m in range(1, 9):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x[:, ::97] *= 30  # a few large activations
        assert int8_gluon.fits(x, w.q)
        got = int8_cuda.int8_gemv(x, w.q, w.scale)
        want = x.double() @ ref_w.T
        err = float((got.double() - want).abs().max() / want.abs().max())
        assert err < 1e-2, (m, err)


@cuda_gluon
def test_split_k_calls_in_one_graph_replay_correctly_again_and_again() -> None:
    """Split-K programs meet on counters shared by every call: chained in a graph and replayed,
    each call must find them reset."""
    torch.manual_seed(0)
    down = quantize(torch.randn(2048, 8192, device="cuda", dtype=torch.bfloat16), "int8")  # split 4
    up = quantize(torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16), "int8")
    x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
    int8_gluon.reserve(x.device)

    def chain(v: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            v = int8_cuda.int8_gemv(int8_cuda.int8_gemv(v, down.q, down.scale) / 64, up.q, up.scale) / 64
        return v

    want = chain(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        assert torch.allclose(out.float(), want.float(), rtol=1e-2, atol=1e-3)
