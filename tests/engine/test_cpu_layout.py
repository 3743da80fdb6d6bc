"""fp32 matrices stored by columns on a CPU (engine/cpu_layout.py): which ones, that every value
and the tied head stay as they were, and that a stage computes what the row layout computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peerpipe.engine import cpu_layout
from peerpipe.engine.kvcache import KVCache
from peerpipe.engine.loader import load_stage
from peerpipe.engine.model import Stage
from peerpipe.engine.quant import quantize


def _by_columns(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.stride() == (1, w.shape[0])


@pytest.mark.parametrize(
    ("shape", "dtype", "laid_out"),
    [((2048, 384), torch.float32, True), ((768, 384), torch.float32, True), ((767, 384), torch.float32, False),
     ((384, 1024), torch.float32, False), ((384, 384), torch.float32, False), ((2048, 384), torch.bfloat16, False)],
)
def test_only_wide_fp32_matrices_are_laid_out_by_columns(shape: tuple[int, int], dtype: torch.dtype, laid_out: bool) -> None:
    lin = nn.Linear(shape[1], shape[0], bias=False).to(dtype)
    before = lin.weight.detach().clone()
    assert cpu_layout.lay_out([lin]) == int(laid_out)
    assert _by_columns(lin.weight) == laid_out and lin.weight.shape == shape
    assert torch.equal(lin.weight, before)
    assert cpu_layout.lay_out([lin]) == 0  # laid out once


def test_a_tied_head_keeps_sharing_the_embedding() -> None:
    embed, head = nn.Embedding(1000, 64), nn.Linear(64, 1000, bias=False)
    head.weight = embed.weight
    assert cpu_layout.lay_out([head], (embed, head)) == 1
    assert embed.weight is head.weight and _by_columns(head.weight)
    ids = torch.tensor([[3, 999]])
    assert torch.equal(embed(ids)[0], head.weight[[3, 999]])


def _step(stage: Stage, ids: list[int]) -> torch.Tensor:
    cache: KVCache = stage.new_cache(1, 16)
    slot = cache.alloc()
    with torch.inference_mode():
        stage(torch.tensor([ids]), cache, cache.batch([slot], len(ids)))
        return stage(torch.tensor([[7]]), cache, cache.batch([slot], 1))


def test_a_loaded_stage_computes_what_the_row_layout_does(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    stage, _ = load_stage(tiny_model_dir("llama"), device="cpu", dtype="float32")
    rows = copy.deepcopy(stage)
    for m in rows.modules():  # every matrix back in its checkpoint's layout
        if isinstance(m, nn.Linear | nn.Embedding):
            m.weight = nn.Parameter(m.weight.detach().contiguous(), requires_grad=False)
    if rows.embed is not None and stage.embed is not None and stage.embed.weight is stage.lm_head.weight:
        rows.lm_head.weight = rows.embed.weight
    rows._gather_weights()
    wide = [b.mlp.w_gate_up.weight for b in stage.layers]
    assert all(_by_columns(w) for w in wide), "the tiny model's gate|up is wide: laid out at load"
    got, want = _step(stage, [1, 2, 3, 4]), _step(rows, [1, 2, 3, 4])
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())  # the same sums, in another order
    assert int(got[0, -1].argmax()) == int(want[0, -1].argmax())


def test_quantized_and_half_precision_stages_keep_their_layout(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    int8, _ = load_stage(tiny_model_dir("llama"), device="cpu", dtype="float32", quantize="int8")
    assert all(not b.mlp.w_gate_up.weight.numel() for b in int8.layers)  # held as int8 instead
    assert int8.lay_out_for_cpu() == 0
    half, _ = load_stage(tiny_model_dir("llama"), device="cpu", dtype="bfloat16")
    assert not any(_by_columns(b.mlp.w_gate_up.weight) for b in half.layers)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_matrix_held_by_columns_quantizes_as_its_rows_do(mode: str) -> None:
    """The planner's benchmark and a later quantization may meet a laid-out matrix."""
    w = torch.randn(256, 64)
    cols = cpu_layout.by_columns(w)
    assert _by_columns(cols)
    a, b = quantize(w, mode, cpu_kernel=False), quantize(cols, mode, cpu_kernel=False)
    assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32))
