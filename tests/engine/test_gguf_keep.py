"""``--quantize keep``: a GGUF's matrices held as precise as the file stores them (4-bit types in
int4, 5- to 8-bit in int8, floats as they are), so a 4-bit model takes about 4-bit memory, with
logits close to the dequantized model's; the planner counts the widest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peerpipe.devtools.tiny_gguf import write_gguf
from peerpipe.engine.errors import ModelLoadError
from peerpipe.engine.loader import keep_width, load_stage
from peerpipe.engine.model import Stage
from peerpipe.engine.quant import Int4Weight, Int8Weight, kept, widest

pytest.importorskip("gguf")
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 3, "head_dim": 64}


def _logits(stage: Stage, ids: torch.Tensor) -> torch.Tensor:
    cache = stage.new_cache(max_slots=1, max_seq=ids.shape[1])
    with torch.inference_mode():
        return stage(ids, cache, cache.batch([cache.alloc()], ids.shape[1]))


def _matrix_bytes(stage: Stage) -> int:
    plain = sum(b.attn.wqkv.weight.numel() + b.attn.wo.weight.numel() + b.mlp.w_gate_up.weight.numel()
                + b.mlp.w_down.weight.numel() for b in stage.layers) * 4
    return plain + sum(q.nbytes for layer in stage._quant for q in layer.values())


@pytest.mark.parametrize(("kind", "held"), [("Q4_0", Int4Weight), ("Q4_K", Int4Weight), ("Q6_K", Int8Weight),
                                            ("Q8_0", Int8Weight)])
def test_keep_holds_each_matrix_in_its_files_precision(tiny_model_dir, tmp_path: Path, kind: str, held: type) -> None:
    src = tiny_model_dir("llama", config_overrides=SHAPE)
    write_gguf(src, tmp_path / "m.gguf", linear=kind)
    ids = torch.tensor([[3, 17, 42, 9, 100, 5, 61]])
    full, _ = load_stage(tmp_path / "m.gguf", device="cpu")
    kept_stage, _ = load_stage(tmp_path / "m.gguf", device="cpu", quantize="keep")
    assert kept_stage.quant_mode == "keep"
    assert all(isinstance(q, held) for layer in kept_stage._quant for q in layer.values())
    assert all(len(layer) == 4 for layer in kept_stage._quant)
    ratio = _matrix_bytes(kept_stage) / _matrix_bytes(full)
    assert ratio < (0.21 if held is Int4Weight else 0.26)  # about 5 (or 8) bits of fp32's 32
    want, got = _logits(full, ids), _logits(kept_stage, ids)
    # 4-bit blocks lie on an int4 grid of 32 values (below: held exactly), here through the CPU
    # kernel's bf16 scales and activations; 6- and 8-bit blocks get one int8 scale per channel.
    err = float((want - got).norm() / want.norm())
    assert err < (0.03 if held is Int4Weight else 0.1)
    mode = "int4" if held is Int4Weight else "int8"
    assert keep_width(tmp_path / "m.gguf") == mode
    if held is Int8Weight:  # one type: keep is that mode (int4 keeps the file's 32-value blocks instead)
        uniform, _ = load_stage(tmp_path / "m.gguf", device="cpu", quantize=mode)
        assert torch.equal(_logits(uniform, ids), got)
    else:
        assert all(q.group == 32 for layer in kept_stage._quant for q in layer.values())


def test_float_files_and_folders_keep_everything(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("llama", config_overrides=SHAPE)
    write_gguf(src, tmp_path / "m.gguf", linear="F16")
    for path in (tmp_path / "m.gguf", src):
        stage, _ = load_stage(path, device="cpu", quantize="keep")
        assert all(not layer for layer in stage._quant)
        assert keep_width(path) == "none"
    with pytest.raises(ModelLoadError, match=r"--model FILE\.gguf"):
        keep_width(None)


@pytest.mark.parametrize(("kind", "mode"), [("Q4_0", "int4-q4_0"), ("Q4_1", "int4")])
def test_q4_blocks_are_held_exactly_on_the_int4_grid(kind: str, mode: str) -> None:
    import gguf
    import numpy as np

    from peerpipe.engine.quant import KEEP_GROUP, quantize

    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32) * 0.02
    qtype = gguf.GGMLQuantizationType[kind]
    stored = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape).copy())
    held = quantize(stored, mode, KEEP_GROUP, exact_zero=True, cpu_kernel=False)
    error = float((held.dequantize(torch.float32) - stored).norm() / (stored - torch.from_numpy(w)).norm())
    assert error < 0.01  # against the file's own quantization error: nothing added


def test_a_fused_matrix_keeps_its_most_precise_part() -> None:
    assert kept(["Q4_K", "Q4_K", "Q6_K"]) == "int8"  # q, k in Q4_K and v in Q6_K, as Q4_K_M files do
    assert kept(["Q4_0", "Q4_1"]) == "int4"
    assert kept(["Q4_K", "F16"]) == "none"
    assert widest(["int4", "int8", "int4"]) == "int8" and widest([]) == "none"


def test_a_room_node_keeps_its_gguf_and_answers_as_the_local_engine_does(tiny_model_dir, tmp_path: Path) -> None:
    import asyncio

    from peerpipe import create_room
    from peerpipe.engine.generate import LocalEngine
    from peerpipe.engine.sampling import SamplingParams
    from peerpipe.engine.tokenizer import Tokenizer

    src = tiny_model_dir("llama", config_overrides=SHAPE)
    gguf_file = tmp_path / "m.gguf"
    write_gguf(src, gguf_file, linear="Q4_1")
    stage, _ = load_stage(gguf_file, device="cpu", quantize="keep")
    tokenizer = Tokenizer.from_dir(gguf_file)
    want = LocalEngine(stage, tokenizer, max_seq=64).generate([3, 17, 42], SamplingParams(temperature=0.0, max_tokens=8))

    async def main() -> list[int]:
        async with create_room(gguf_file, dtype="float32", device="cpu", context=64, quick=True, quantize="keep",
                               speculate="off") as room:
            view_quantize = room.view().members[0].info.quantize
            assert view_quantize == "int4"  # what the planner counts: the widest the file keeps
            result = await room.generate([3, 17, 42], temperature=0.0, max_tokens=8)
            return list(result.tokens)

    assert asyncio.run(asyncio.wait_for(main(), 120)) == list(want.tokens)
