"""Weights in fewer bits: error bounds, sizes, products, and a stage that holds its layers so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peerpipe.engine.loader import load_stage
from peerpipe.engine.quant import INT4_GROUP, Int4Weight, Int8Weight, QuantizeError, linear, quantize
from peerpipe.models import default_model_dir


def weights(seed: int, out: int = 96, inp: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[:, 3] *= 20  # an outlier input channel
    return w


@pytest.mark.parametrize("seed", range(5))
def test_int8_rows_are_within_half_a_step_of_their_channel(seed: int) -> None:
    w = weights(seed)
    q = quantize(w, "int8")
    assert isinstance(q, Int8Weight) and q.q.dtype == torch.int8 and q.nbytes == 96 * 256 + 96 * 4
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((q.dequantize(torch.float32) - w).abs() <= step / 2 * 1.001 + 1e-9).all())


@pytest.mark.parametrize("seed", range(5))
def test_int4_groups_are_within_half_a_step_of_their_group(seed: int) -> None:
    w = weights(seed)
    q = quantize(w, "int4", cpu_kernel=False)  # the portable layout, float16 scales
    assert isinstance(q, Int4Weight) and q.packed.shape == (96, 128) and q.packed.dtype == torch.uint8
    groups = w.view(96, -1, INT4_GROUP)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    error = (q.dequantize(torch.float32) - w).view(96, -1, INT4_GROUP).abs()
    # Half a step, plus the float16 rounding of the scale and zero point over 15 steps.
    assert bool((error <= step.unsqueeze(-1) * (0.5 + 15 * 2**-10) + 1e-6).all())


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_product_equals_the_product_with_the_dequantized_matrix(mode: str, dtype: torch.dtype) -> None:
    w = weights(7)
    q = quantize(w.to(dtype), mode)
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(96).to(dtype)
    want = F.linear(x.float(), q.dequantize(torch.float32), bias.float())
    got = linear(x, q, bias)
    assert got.dtype == dtype and got.shape == (2, 5, 96)
    # int8 on a CPU multiplies bf16 activations (the fast kernel): allow bf16's rounding.
    assert torch.allclose(got.float(), want, atol=0.05 * want.abs().max().item(), rtol=0)


def test_bad_settings_and_shapes_are_typed_errors() -> None:
    with pytest.raises(QuantizeError, match="none, int8, int4"):
        quantize(weights(0), "int3")
    with pytest.raises(QuantizeError, match="multiple of 64"):
        quantize(torch.randn(8, 100), "int4")
    with pytest.raises(QuantizeError, match="only matrices"):
        quantize(torch.randn(8), "int8")


@pytest.mark.parametrize(("mode", "atol"), [("int8", 0.15), ("int4", 1.5)])
def test_a_quantized_stage_holds_less_and_answers_nearly_the_same(mode: str, atol: float) -> None:
    out, held = {}, {}
    for m in ("none", mode):
        stage, _ = load_stage(default_model_dir(), 2, 4, device="cpu", dtype="float32", quantize=m)
        assert stage.quant_mode == m
        cache = stage.new_cache(1, 32)
        slot = cache.alloc()
        hidden = torch.randn(1, 9, 384, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            out[m] = stage(hidden, cache, cache.batch([slot], 9))
        params = sum(p.numel() * p.element_size() for p in stage.parameters())
        held[m] = params + sum(q.nbytes for layer in stage._quant for q in layer.values())
    assert held[mode] < held["none"] * (0.3 if mode == "int8" else 0.2)
    assert (out[mode] - out["none"]).abs().max().item() < atol
    with pytest.raises(ValueError, match="already held"):
        stage.quantize("int4" if mode == "int8" else "int8")


def test_int4_on_a_cpu_uses_pytorchs_kernel_layout_at_the_same_memory() -> None:
    w = weights(3)
    portable = quantize(w, "int4", cpu_kernel=False)
    held = quantize(w, "int4")
    assert isinstance(held, Int4Weight) and held.cpu_packed is not None and not held.packed.numel()
    assert held.nbytes <= portable.nbytes * 1.05  # the kernel's layout replaces the portable one
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    want = F.linear(x, portable.dequantize(torch.float32))
    # bf16 activations and bf16 scales in the kernel: within bf16's rounding of the product.
    assert torch.allclose(held.linear(x), want, atol=0.02 * want.abs().max().item(), rtol=0)
    assert torch.allclose(held.dequantize(torch.float32), portable.dequantize(torch.float32), atol=0.01 * w.abs().max().item())


def test_an_int8_head_also_serves_the_tied_embedding_and_answers_nearly_the_same() -> None:
    """On CUDA an int8 stage holds its head in int8 too (the decode kernel reads it at twice
    bf16's speed); a whole model with tied embeddings then looks its token rows up in it."""
    stage, _ = load_stage(default_model_dir(), device="cpu", dtype="float32")
    ids = torch.tensor([[5, 17, 42, 99, 3]])

    def logits() -> torch.Tensor:
        cache = stage.new_cache(1, 16)
        with torch.inference_mode():
            return stage(ids, cache, cache.batch([cache.alloc()], ids.shape[1]))

    want = logits()
    assert stage.embed is not None and stage.embed.weight.data_ptr() == stage.lm_head.weight.data_ptr()
    stage._quantize_head()  # what quantize("int8") does on a CUDA stage
    assert stage._embed_from_head and not stage.embed.weight.numel() and not stage.lm_head.weight.numel()
    got = logits()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert bool((got[0, -1].topk(3).indices == want[0, -1].topk(3).indices).all())
