"""The bf16 Gluon decode kernel (engine/bf16_gluon*.py): which products it takes, its tiles
anywhere, and its products against float64 on CUDA (skipped without a GPU and Triton's Gluon)."""

from __future__ import annotations

import pytest
import torch

from peerpipe.engine import bf16_gluon, int8_gluon

SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048), (6144, 4096), (4096, 14336),
          (1000, 512), (640, 1536)]


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_every_choice_tiles_k_whole_and_keeps_its_partial_sums_in_the_workspace(n: int, k: int) -> None:
    plan = bf16_gluon.choose(n, k, 1)
    assert plan is not None
    tiles, split = plan
    assert tiles["TN"] * tiles["TK"] == 32  # one warp
    words, step, block = k // 2, tiles["TK"] * 4, tiles["R"] * tiles["TN"] * tiles["W"]
    assert words % (step * split) == 0 and words // (step * split) >= 1
    if split > 1:
        assert -(-n // block) * split * block <= int8_gluon.WORKSPACE_FLOATS and -(-n // block) <= int8_gluon.COUNTERS


@pytest.mark.parametrize(("n", "k", "m"), [(2048, 2048, 2), (2048, 2048, 8), (2048, 200, 1), (64, 64, 1)])
def test_more_rows_or_ragged_widths_stay_with_cublas(n: int, k: int, m: int) -> None:
    assert bf16_gluon.choose(n, k, m) is None


def test_without_a_capable_gpu_linear_is_torchs() -> None:
    x, w = torch.randn(1, 512), torch.randn(1024, 512)
    assert not bf16_gluon.prepare(torch.device("cpu")) or torch.cuda.is_available()
    assert torch.equal(bf16_gluon.linear(x, w), torch.nn.functional.linear(x, w))


cuda_gluon = pytest.mark.skipif(
    not torch.cuda.is_available() or bf16_gluon._kernel() is None, reason="needs CUDA and Triton's Gluon"
)


@cuda_gluon
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_the_kernel_multiplies_as_float64_does(n: int, k: int) -> None:
    assert bf16_gluon.prepare(torch.device("cuda"))
    torch.manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    x[:, ::97] *= 30  # a few large activations
    assert bf16_gluon.fits(x, w)
    got = bf16_gluon.gemv(x, w)
    want = x.double() @ w.double().T
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < 1e-2, err
    assert not bf16_gluon.fits(torch.cat([x, x]), w)


@cuda_gluon
def test_split_k_calls_in_one_graph_replay_what_they_compute_launched_alone() -> None:
    """Split-K programs meet on counters shared by every call: chained in a graph and replayed,
    each call must find them reset; partial sums are added in a fixed order, so bit for bit."""
    assert bf16_gluon.prepare(torch.device("cuda"))
    torch.manual_seed(0)
    down = torch.randn(2048, 8192, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
    assert bf16_gluon.choose(2048, 8192, 1)[1] > 1  # type: ignore[index]

    def chain(v: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            v = bf16_gluon.gemv(bf16_gluon.gemv(v, down) / 64, up) / 64
        return v

    want = chain(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(out, want)


@cuda_gluon
def test_a_graphed_decode_step_through_the_kernel_equals_an_eager_one(tiny_model_dir) -> None:
    from peerpipe.engine.cuda_graphs import GraphedDecoder
    from peerpipe.engine.loader import load_stage

    path = tiny_model_dir("llama", seed=5, config_overrides={"hidden_size": 512, "intermediate_size": 1024,
                                                             "num_attention_heads": 8, "num_key_value_heads": 2})
    stage, _ = load_stage(path, device="cuda", dtype="bfloat16")
    prompt = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(1)).cuda()
    outs = []
    for graphed in (False, True):
        cache = stage.new_cache(1, 64)
        slot = cache.alloc()
        decoder = GraphedDecoder(stage, cache) if graphed else None
        with torch.inference_mode():
            stage(prompt[:, :8], cache, cache.batch([slot], 8))
            batch = cache.batch([slot], 1)
            one = prompt[:, 8:]
            outs.append((decoder(one, batch) if decoder else stage(one, cache, batch)).float().cpu())
    assert bf16_gluon.fits(torch.empty(1, 512, device="cuda", dtype=torch.bfloat16), stage.layers[0].attn.wqkv.weight)
    scale = outs[0].abs().max()
    assert (outs[0] - outs[1]).abs().max() / scale < 2e-2


@cuda_gluon
def test_a_compiled_layer_calls_the_kernel_as_one_operation() -> None:
    assert bf16_gluon.prepare(torch.device("cuda"))
    w = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16) / 32
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(lambda v: torch.relu(bf16_gluon.linear(torch.sin(v), w)), fullgraph=True)
    assert torch.allclose(fn(x).float(), torch.relu(torch.sin(x) @ w.T).float(), rtol=2e-2, atol=2e-2)
