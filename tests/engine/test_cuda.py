"""GPU paths: the same numbers on CUDA, and CUDA-graph decode equal to eager decode.

Skipped where no CUDA GPU exists (CI); run on the device machine with
``python -m pytest tests/engine/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.loader import load_stage
from peerpipe.engine.sampling import SamplingParams
from peerpipe.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_cuda_float32_matches_cpu(tiny_model_dir, arch: str) -> None:
    path = tiny_model_dir(arch, seed=2)
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    out = {}
    for device in ("cpu", "cuda"):
        stage, _ = load_stage(path, device=device, dtype="float32")
        cache = stage.new_cache(2, 32)
        slots = [cache.alloc(), cache.alloc()]
        with torch.inference_mode():
            out[device] = stage(ids.to(device), cache, cache.batch(slots, 20)).float().cpu()
    # TF32 may be on for matmuls; allow its rounding.
    assert (out["cpu"] - out["cuda"]).abs().max().item() < 5e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_equals_eager(tiny_model_dir, dtype: str) -> None:
    path = tiny_model_dir("llama3", seed=8, config_overrides={"max_position_embeddings": 512})
    stage, _ = load_stage(path, device="cuda", dtype=dtype)
    tok = Tokenizer.from_dir(path)
    params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)  # crosses two KV buckets
    prompt = list(range(3, 40))
    eager = LocalEngine(stage, tok, max_seq=256, cuda_graphs=False).generate(prompt, params)
    graphed_engine = LocalEngine(stage, tok, max_seq=256, cuda_graphs=True)
    graphed = graphed_engine.generate(prompt, params)
    assert graphed.tokens == eager.tokens
    again = graphed_engine.generate(prompt, params)  # replays the captured graphs
    assert again.tokens == eager.tokens


def test_graph_decode_seeded_sampling_reproducible(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen2", seed=8)
    stage, _ = load_stage(path, device="cuda", dtype="bfloat16")
    engine = LocalEngine(stage, Tokenizer.from_dir(path), max_seq=128, cuda_graphs=True)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=40, ignore_eos=True)
    assert engine.generate([5, 6, 7], params).tokens == engine.generate([5, 6, 7], params).tokens
