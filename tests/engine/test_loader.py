"""Loading a stage reads only that stage's tensors, and bad folders fail with clear errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from peerpipe.engine.config import ModelConfig
from peerpipe.engine.errors import ModelLoadError, UnsupportedModelError
from peerpipe.engine.loader import load_stage


def _rchar() -> int:
    """Bytes this process has read through read(2) so far, as the kernel counts them."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc I/O accounting")
@pytest.mark.parametrize("shards", [1, 4])
def test_two_of_eight_layers_read_well_under_half(tiny_model_dir, shards: int) -> None:
    path = tiny_model_dir(
        "llama",
        shards=shards,
        config_overrides={"num_hidden_layers": 8, "hidden_size": 128, "intermediate_size": 384},
    )
    files = list(path.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    before = _rchar()
    stage, stats = load_stage(path, 3, 5, device="cpu")
    read_by_kernel = _rchar() - before
    # A middle stage has no embedding or head: two layers out of eight is about a quarter.
    assert stats.bytes_read < 0.3 * total
    assert read_by_kernel < 0.3 * total + 64 * 1024  # headers and config files are small
    names = set(stage.state_dict())
    assert all(n.startswith("layers.0.") or n.startswith("layers.1.") for n in names)
    assert stage.embed is None and not hasattr(stage, "lm_head")
    cfg = ModelConfig.from_dir(path)
    held = sum(p.numel() for p in stage.parameters())
    assert held == 2 * cfg.layer_param_count()


def test_first_and_last_stage_own_embedding_and_head(tiny_model_dir) -> None:
    path = tiny_model_dir("llama3", shards=2)  # tied embeddings
    first, _ = load_stage(path, 0, 2, device="cpu")
    last, _ = load_stage(path, 2, 4, device="cpu")
    whole, _ = load_stage(path, device="cpu")
    assert first.embed is not None and not hasattr(first, "lm_head")
    assert last.embed is None and torch.equal(last.lm_head.weight, whole.embed.weight)
    # A tied single stage keeps one copy of the matrix.
    assert whole.lm_head.weight.data_ptr() == whole.embed.weight.data_ptr()


@pytest.mark.parametrize(("dtype", "expected"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_checkpoints_load_in_chosen_dtype(tiny_model_dir, dtype: str, expected: torch.dtype) -> None:
    path = tiny_model_dir("qwen2", dtype=dtype)
    as_is, _ = load_stage(path, device="cpu", dtype=dtype)
    upcast, _ = load_stage(path, device="cpu")  # the CPU default is float32
    assert as_is.layers[0].attn.wqkv.weight.dtype == expected
    assert upcast.layers[0].attn.wqkv.weight.dtype == torch.float32
    torch.testing.assert_close(as_is.embed.weight.float(), upcast.embed.weight, rtol=0, atol=0)


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_stage(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_stage(tmp_path)


def test_unsupported_architecture_names_the_supported_ones(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("llama")
    dst = tmp_path / "gpt2"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM.*Qwen3ForCausalLM") as err:
        load_stage(dst)
    assert "GPT2LMHeadModel" in str(err.value)


def test_truncated_checkpoint_is_a_load_error(tiny_model_dir, tmp_path: Path) -> None:
    dst = tmp_path / "cut"
    shutil.copytree(tiny_model_dir("llama"), dst)
    weights = dst / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ModelLoadError, match="inconsistent offsets"):
        load_stage(dst, device="cpu")


def test_shape_mismatch_with_config_is_reported(tiny_model_dir, tmp_path: Path) -> None:
    dst = tmp_path / "wrong"
    shutil.copytree(tiny_model_dir("llama"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="shape"):
        load_stage(dst, device="cpu")


def test_bad_range_and_device(tiny_model_dir) -> None:
    path = tiny_model_dir("llama")
    with pytest.raises(ModelLoadError, match="layer range"):
        load_stage(path, 3, 9)
    with pytest.raises(ModelLoadError, match="device"):
        load_stage(path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA"):
            load_stage(path, device="cuda:0")


def test_progress_reports_every_byte(tiny_model_dir) -> None:
    seen: list[tuple[int, int]] = []
    _, stats = load_stage(tiny_model_dir("mistral"), device="cpu", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (stats.bytes_read, stats.bytes_read)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
