"""The residual add and RMSNorm run by the product that follows them (engine/normed.py,
norm_gluon.py): the separate operations everywhere, and on CUDA the bf16 and int8 kernels against
HF's roundings and float64 (skipped without a GPU and Triton's Gluon)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peerpipe.engine import bf16_gluon, int8_gluon, normed
from peerpipe.engine.normed import normed_linear, rms_norm
from peerpipe.engine.quant import Int8Weight, glu_linear, linear, quantize


def _hf(r: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama's RMSNorm: normalized in float32, rounded, times the weight, rounded."""
    return g * (r.float() * torch.rsqrt(r.float().pow(2).mean(-1, keepdim=True) + eps)).to(r.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("glu", [False, True])
def test_anywhere_else_it_is_the_add_the_norm_and_the_product(dtype: torch.dtype, glu: bool) -> None:
    torch.manual_seed(0)
    x, delta = torch.randn(1, 3, 32, dtype=dtype), torch.randn(1, 3, 32, dtype=dtype)
    g, w, bias = torch.rand(32, dtype=dtype), torch.randn(64, 32, dtype=dtype), torch.randn(64, dtype=dtype)
    r, y = normed_linear(x, delta, g, 1e-5, w, None if glu else bias, glu=glu)
    assert torch.equal(r, x + delta)
    n = rms_norm(x + delta, g, 1e-5)
    assert torch.equal(y, glu_linear(n, w) if glu else linear(n, w, bias))
    r, y = normed_linear(x, None, g, 1e-5, w)
    assert r is x and torch.equal(y, linear(rms_norm(x, g, 1e-5), w))


def test_a_prologue_counts_its_steps_in_powers_of_two() -> None:
    x = torch.zeros(1, 3072, dtype=torch.bfloat16)
    p = int8_gluon.Prologue(None, torch.ones(3072, dtype=torch.bfloat16), 1e-6, x)
    (d, gw, rw, eps, k), const = p.args(torch.int32, 3072, 128, 1536)
    assert (k, eps, const) == (3072, 1e-6, dict(NORM=True, HAS_DELTA=False, STEPS=12, P2=16))
    assert d.dtype == gw.dtype == rw.dtype == torch.int32 and d.numel() == 1536


cuda_gluon = pytest.mark.skipif(
    not torch.cuda.is_available() or bf16_gluon._kernel() is None or int8_gluon._kernels() is None,
    reason="needs CUDA and Triton's Gluon",
)

# (outputs, K, glu): the 1B shape's q|k|v and MLP, the 8B shape's q|k|v (int8 splits it along
# K), a width of 12 steps (not a power of two), outputs no block divides
CASES = [(3072, 2048, False), (8192, 2048, True), (6144, 4096, False), (1024, 3072, False), (1001, 2048, True),
         (1000, 1024, False)]


def _inputs(k: int, delta: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    torch.manual_seed(k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) * 3
    d = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) if delta else None
    g = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
    return x, d, g


def _want(n: torch.Tensor, w: torch.Tensor, glu: bool) -> torch.Tensor:
    """float64 product of the normalized row (gate and up rounded to bf16 first with ``glu``)."""
    y = n.double() @ w.T
    if not glu:
        return y
    gate, up = y.to(torch.bfloat16).double().chunk(2, -1)
    return F.silu(gate) * up


@cuda_gluon
@pytest.mark.parametrize("delta", [True, False])
@pytest.mark.parametrize(("n", "k", "glu"), CASES)
def test_the_kernels_normalize_as_hf_and_multiply_as_float64(n: int, k: int, glu: bool, delta: bool) -> None:
    assert bf16_gluon.prepare(torch.device("cuda"))
    x, d, g = _inputs(k, delta)
    r_want = x + d if d is not None else x
    n_want = _hf(r_want, g, 1e-5)
    rows = 2 * n if glu else n
    w = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    q = quantize(w, "int8")
    assert isinstance(q, Int8Weight)
    for weights, dense in ((w, w.double()), (q, q.q.double() * q.scale.double().unsqueeze(1))):
        if isinstance(weights, torch.Tensor) and bf16_gluon.choose(rows // 2 if glu else rows, k, 1, glu) is None:
            continue  # K not a multiple of 512: the bf16 kernel does not take it
        assert normed.fits(x, d, g, weights, glu)
        wq, scale = (weights.q, weights.scale) if isinstance(weights, Int8Weight) else (weights, None)
        r, y = normed._opaque(x, d, g, 1e-5, wq, scale, glu)
        if d is not None:
            assert torch.equal(r, r_want)  # the stream bit for bit, as torch adds it
        want = _want(n_want, dense, glu)
        assert y.shape == (1, n)
        assert float((y.double() - want).abs().max() / want.abs().max()) < 1e-2, type(weights)


@cuda_gluon
@pytest.mark.parametrize("k", [2048, 3072])
def test_the_normalized_row_is_hf_s_to_the_last_bit_almost_everywhere(k: int) -> None:
    """Through an identity matrix the product is the normalized row itself: HF's roundings, with
    at most a few numbers one bf16 step away (the sum of squares added in another order)."""
    assert bf16_gluon.prepare(torch.device("cuda"))
    x, d, g = _inputs(k, True)
    eye = torch.eye(k, device="cuda", dtype=torch.bfloat16)
    _, y = normed._opaque(x, d, g, 1e-5, eye, None, False)
    want = _hf(x + d, g, 1e-5)
    differ = y != want
    assert int(differ.sum()) <= k // 100
    step = want.float().abs() * 2**-7
    assert bool(((y.float() - want.float()).abs() <= step + 1e-30)[differ].all())


@cuda_gluon
def test_a_graph_and_a_compiled_layer_take_the_kernel() -> None:
    assert bf16_gluon.prepare(torch.device("cuda"))
    x, d, g = _inputs(2048, True)
    w = torch.randn(3072, 2048, device="cuda", dtype=torch.bfloat16) / 45
    q = quantize(w, "int8")
    for weights in (w, q):
        wq, scale = (weights.q, weights.scale) if isinstance(weights, Int8Weight) else (weights, None)
        r_ref, y_ref = normed._opaque(x, d, g, 1e-5, wq, scale, False)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            r, y = normed_linear(x.view(1, 1, -1), d.view(1, 1, -1), g, 1e-5, weights)
        graph.replay()
        assert torch.equal(r.view(1, -1), r_ref) and torch.equal(y.view(1, -1), y_ref)
        compiled = torch.compile(lambda a, b, m=weights: normed_linear(a, b, g, 1e-5, m), fullgraph=True)
        r, y = compiled(x.view(1, 1, -1), d.view(1, 1, -1))
        assert torch.equal(r.view(1, -1), r_ref) and torch.equal(y.view(1, -1), y_ref)
        eager_r, eager_y = normed_linear(x.view(1, 1, -1), d.view(1, 1, -1), g, 1e-5, weights)  # not graphed: torch's ops
        assert torch.equal(eager_r.view(1, -1), r_ref)
        assert float((eager_y.view(1, -1).double() - y_ref.double()).abs().max() / y_ref.double().abs().max()) < 2e-2
