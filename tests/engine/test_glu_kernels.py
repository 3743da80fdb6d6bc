"""silu(gate) * up of a fused gate|up product in one kernel (engine/quant.glu_linear through
bf16_gluon.py and int8_gluon_fma.py): against the unfused product everywhere, and on CUDA the
kernels against float64 (skipped without a GPU and Triton's Gluon)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peerpipe.engine import bf16_gluon, int8_cuda, int8_gluon
from peerpipe.engine.quant import Int8Weight, glu_linear, quantize

# (outputs, K): the 1B and 8B shapes' MLPs, a small one, counts of outputs the bf16 block (1000)
# and both kernels' blocks (1001) do not divide
SHAPES = [(8192, 2048), (14336, 4096), (1024, 512), (1000, 512), (1001, 512)]


def _want(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """float64 silu(gate) * up, gate and up rounded to bf16 as the unfused products are."""
    g = (x.double() @ gate.T).to(torch.bfloat16).double()
    u = (x.double() @ up.T).to(torch.bfloat16).double()
    return F.silu(g) * u


def test_anywhere_else_it_is_the_unfused_product() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    x = torch.randn(1, 3, 32)
    gate, up = F.linear(x, w).chunk(2, -1)
    assert torch.equal(glu_linear(x, w), F.silu(gate) * up)
    q = quantize(w, "int8")
    assert isinstance(q, Int8Weight)
    gate, up = q.linear(x).chunk(2, -1)
    assert torch.equal(glu_linear(x, q), F.silu(gate) * up)


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_glu_tiles_cover_k_whole_and_never_split_it(n: int, k: int) -> None:
    plan = bf16_gluon.choose(n, k, 1, glu=True)
    assert plan is not None and plan[1] == 1  # silu needs whole sums: no split along K
    tiles = plan[0]
    assert tiles["TN"] * tiles["TK"] == 32 and (k // 2) % (tiles["TK"] * 4) == 0
    assert bf16_gluon.choose(n, k, 2, glu=True) is None and bf16_gluon.choose(n, 1000, 1, glu=True) is None
    _, tiles, _ = int8_gluon.choose(2 * n, k, 1)
    glu_tiles = int8_gluon.glu_tiles(n, k)
    assert 2 * glu_tiles["R"] * glu_tiles["W"] == tiles["R"] * tiles["W"] and glu_tiles["TK"] == tiles["TK"]


cuda_gluon = pytest.mark.skipif(
    not torch.cuda.is_available() or bf16_gluon._kernel() is None or int8_gluon._kernels() is None,
    reason="needs CUDA and Triton's Gluon",
)


@cuda_gluon
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_the_bf16_kernel_gates_as_float64_does(n: int, k: int) -> None:
    assert bf16_gluon.prepare(torch.device("cuda"))
    torch.manual_seed(n + k)
    w = torch.randn(2 * n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    assert bf16_gluon.fits(x, w, glu=True)
    got = bf16_gluon.gemv(x, w, glu=True)
    want = _want(x, w[:n].double(), w[n:].double())
    assert got.shape == (1, n)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-2


@cuda_gluon
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_the_int8_kernel_gates_as_float64_does(n: int, k: int) -> None:
    torch.manual_seed(n + k)
    q = quantize(torch.randn(2 * n, k, device="cuda", dtype=torch.bfloat16), "int8")
    assert isinstance(q, Int8Weight)
    deq = q.q.double() * q.scale.double().unsqueeze(1)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    assert int8_cuda.glu_fits(x, q.q) and not int8_cuda.glu_fits(torch.cat([x, x]), q.q)
    got = glu_linear(x, q)
    want = _want(x, deq[:n], deq[n:])
    assert got.shape == (1, n)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-2


@cuda_gluon
def test_compiled_and_graphed_it_is_one_operation() -> None:
    assert bf16_gluon.prepare(torch.device("cuda"))
    torch.manual_seed(1)
    w = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16) / 32
    x = torch.randn(1, 1, 1024, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(lambda v: glu_linear(v * 2, w) + 1, fullgraph=True)
    want = _want((x * 2).view(1, -1), w[:1024].double(), w[1024:].double()) + 1
    assert float((fn(x).view(1, -1).double() - want).abs().max() / want.abs().max()) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = glu_linear(x, w)
    graph.replay()
    assert out.shape == (1, 1, 1024) and torch.equal(out, bf16_gluon.gemv(x.view(1, -1), w, glu=True).view(1, 1, -1))
