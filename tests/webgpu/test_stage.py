"""WebGPU stages (wgpu on whatever adapter is here; Mesa's lavapipe in CI) against the torch
stage: the same logits for every architecture, prefill, decode batches, scattered slots, rollback,
sliding windows and pipeline splits; f16 storage within its rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peerpipe.devtools.tiny_model import write_tiny_model
from peerpipe.engine.loader import load_stage
from peerpipe.webgpu.bench import matmul_tflops
from peerpipe.webgpu.executor import Dispatch, WebGPUError
from peerpipe.webgpu.load import load_webgpu_stage, local_executor
from peerpipe.webgpu.stage import WebGPUStage
from tests.webgpu.adapters import needs_wgpu

pytestmark = needs_wgpu
F32_TOL = 2e-5  # relative to the largest logit: f32 sums in another order
F16_TOL = 5e-3  # f16 storage of the matrices


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wgpu-models")
    out = {arch: write_tiny_model(root / arch, arch) for arch in ("llama", "llama3", "qwen2", "qwen3")}
    out["mistral-window"] = write_tiny_model(root / "mw", "mistral", config_overrides={"sliding_window": 5})
    return out


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "qwen3", "mistral-window"])
def test_a_stage_gives_the_torch_stages_logits(models: dict[str, Path], arch: str) -> None:
    ref, _ = load_stage(models[arch], device="cpu", dtype="float32")
    gpu = WebGPUStage.from_torch(local_executor(), ref, "f32")
    tc, wc = ref.new_cache(3, 32), gpu.new_cache(3, 32)
    for cache in (tc, wc):
        for _ in range(3):
            cache.alloc()
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = ref(ids, tc, tc.batch([0, 2], 9)), gpu(ids, wc, wc.batch([0, 2], 9))
        assert a.shape == b.shape and _rel(a, b) < F32_TOL
        for _ in range(3):  # a decode batch of two sessions in slots 0 and 2
            nxt = a[:, -1].argmax(-1, keepdim=True)
            a = ref(nxt, tc, tc.batch([2, 0], 1), last_only=True)
            b = gpu(nxt, wc, wc.batch([2, 0], 1), last_only=True)
            assert b.shape == (2, 1, ref.cfg.vocab_size) and _rel(a, b) < F32_TOL
        tc.rollback(0, 4)
        wc.rollback(0, 4)  # redrafted: positions 4.. are written again
        drafts = torch.tensor([[7, 8, 9]])
        a, b = ref(drafts, tc, tc.batch([0], 3)), gpu(drafts, wc, wc.batch([0], 3))
        assert _rel(a, b) < F32_TOL


def test_stages_split_like_a_pipeline_and_f16_weights_stay_close(models: dict[str, Path]) -> None:
    path = models["llama"]
    ref, _ = load_stage(path, device="cpu", dtype="float32")
    first, _ = load_webgpu_stage(path, 0, 2, dtype="float32")
    last, _ = load_webgpu_stage(path, 2, 4, dtype="float32")
    assert (first.is_first, first.is_last, last.is_first, last.is_last) == (True, False, False, True)
    caches = [s.new_cache(1, 40) for s in (ref, first, last)]
    for c in caches:
        c.alloc()
    ids = torch.randint(0, 500, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = ref(ids, caches[0], caches[0].batch([0], 30), last_only=True)
        hidden = first(ids, caches[1], caches[1].batch([0], 30))
        assert hidden.shape == (1, 30, ref.cfg.hidden_size)
        got = last(hidden, caches[2], caches[2].batch([0], 30), last_only=True)
    assert _rel(want, got) < F32_TOL
    if not local_executor().has_f16:
        return
    half, _ = load_webgpu_stage(path, dtype="float16")
    assert half.weight_type == "f16" and half.nbytes < first.nbytes + last.nbytes
    cache = half.new_cache(1, 40)
    cache.alloc()
    with torch.inference_mode():
        approx = half(ids, cache, cache.batch([0], 30), last_only=True)
    assert _rel(want, approx) < F16_TOL


def test_a_prompt_longer_than_one_forward_runs_in_pieces(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path = models["llama3"]
    ref, _ = load_stage(path, device="cpu", dtype="float32")
    gpu = WebGPUStage.from_torch(local_executor(), ref, "f32")
    # Attention's scratch bounds the rows of one forward: here to 16.
    monkeypatch.setattr("peerpipe.webgpu.stage.SCRATCH_BYTES", 16 * ref.cfg.n_heads * 201 * 4)
    tc, wc = ref.new_cache(1, 200), gpu.new_cache(1, 200)
    assert gpu.max_rows == 16
    tc.alloc()
    wc.alloc()
    ids = torch.randint(0, 500, (1, 50), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        a, b = ref(ids, tc, tc.batch([0], 50)), gpu(ids, wc, wc.batch([0], 50))
        assert a.shape == b.shape and _rel(a, b) < F32_TOL
        a = ref(ids[:, :20], tc, tc.batch([0], 20), last_only=True)
        b = gpu(ids[:, :20], wc, wc.batch([0], 20), last_only=True)
        assert b.shape == (1, 1, ref.cfg.vocab_size) and _rel(a, b) < F32_TOL


def test_the_seeds_matmul_kernel_computes_a_product_and_reports_tflops() -> None:
    gpu = local_executor()
    n = 64
    a, b = torch.randn(n, n), torch.randn(n, n)
    p, ba, bb, bc = gpu.buffer(4), gpu.buffer(n * n * 4), gpu.buffer(n * n * 4), gpu.buffer(n * n * 4)
    gpu.write(p, n.to_bytes(4, "little"))
    gpu.write(ba, a.numpy().tobytes())
    gpu.write(bb, b.numpy().tobytes())
    gpu.write(bc, torch.full((n, n), float("nan")).numpy().tobytes())  # every element must be written
    (raw,) = gpu.run([Dispatch("bench_matmul", (p, ba, bb, bc), (n // 32, n // 32, 1))], [(bc, n * n * 4)])
    got = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(n, n)
    assert torch.allclose(got, a @ b, rtol=1e-4, atol=1e-4)
    gpu.free([p, ba, bb, bc])
    assert matmul_tflops(256, gpu=gpu, rounds=1) > 0
    with pytest.raises(ValueError, match="multiples of 32"):
        matmul_tflops(100, gpu=gpu)


def test_what_a_webgpu_stage_cannot_do_is_a_clear_error(models: dict[str, Path]) -> None:
    with pytest.raises(WebGPUError, match="--quantize int8 needs a torch device"):
        load_webgpu_stage(models["llama"], quantize="int8")
    with pytest.raises(WebGPUError, match="float32 or float16"):
        load_webgpu_stage(models["llama"], dtype="int8")
    ref, _ = load_stage(models["llama"], device="cpu", dtype="float32")
    gpu = WebGPUStage.from_torch(local_executor(), ref, "f32")
    gpu.new_cache(1, 8)
    other = ref.new_cache(1, 8)
    other.alloc()
    with pytest.raises(WebGPUError, match="only with the cache it made"):
        gpu(torch.tensor([[1]]), other, other.batch([0], 1))
    with pytest.raises(WebGPUError, match="larger than this adapter binds"):
        local_executor().buffer(local_executor().max_binding + 16)
