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
    again = graphed_engine.generate(prompt, params)  # replays the captured graphs
    assert again.tokens == graphed.tokens
    if dtype == "float32":
        assert graphed.tokens == eager.tokens
    else:
        # In bf16 a graph's attention is engine/attention_cuda.py's kernel, eager's is SDPA: they
        # round differently, and a random model's near-ties flip sooner or later (at token 39 or
        # 134 of 150 on an H200, by the kernel's split). So the graphs, fed eager's tokens, must
        # rank each next eager token first or within a near-tie of it, at every step.
        from peerpipe.engine.cuda_graphs import GraphedDecoder

        cache = stage.new_cache(1, 256)
        slot = cache.alloc()
        decoder = GraphedDecoder(stage, cache)
        with torch.inference_mode():
            stage(torch.tensor([prompt], device="cuda"), cache, cache.batch([slot], len(prompt)))
            for tok, nxt in zip(eager.tokens, eager.tokens[1:], strict=False):
                logits = decoder(torch.tensor([[tok]], device="cuda"), cache.batch([slot], 1))[0, -1].float()
                assert logits[nxt] >= logits.max() - 0.02 * logits.abs().max()


def test_compiled_graph_decode_equals_eager(tiny_model_dir) -> None:
    # float32, so compiled and eager kernels round alike enough for equal greedy tokens; the
    # compiled layer must see the key and value it has just written (a stale cache read once
    # changed every token).
    path = tiny_model_dir("qwen3", seed=8, config_overrides={"max_position_embeddings": 512})
    stage, _ = load_stage(path, device="cuda", dtype="float32")
    tok = Tokenizer.from_dir(path)
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    prompt = list(range(3, 40))
    eager = LocalEngine(stage, tok, max_seq=256, cuda_graphs=False).generate(prompt, params)
    compiled = LocalEngine(stage, tok, max_seq=256, cuda_graphs=True, compile_layers=True).generate(prompt, params)
    assert compiled.tokens == eager.tokens


def test_graph_decode_seeded_sampling_reproducible(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen2", seed=8)
    stage, _ = load_stage(path, device="cuda", dtype="bfloat16")
    engine = LocalEngine(stage, Tokenizer.from_dir(path), max_seq=128, cuda_graphs=True)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=40, ignore_eos=True)
    assert engine.generate([5, 6, 7], params).tokens == engine.generate([5, 6, 7], params).tokens


@pytest.mark.parametrize("n_new", [2, 3, 5])
def test_a_graphed_step_of_several_positions_equals_eager(tiny_model_dir, n_new: int) -> None:
    """A verification's width is padded to a power of two; the padding computes nothing anyone
    reads, and the real columns equal an eager forward's."""
    from peerpipe.engine.cuda_graphs import GraphedDecoder

    path = tiny_model_dir("llama", seed=3)
    stage, _ = load_stage(path, device="cuda", dtype="float32")
    prompt = torch.randint(0, 500, (1, 11), generator=torch.Generator().manual_seed(1)).cuda()
    step = torch.randint(0, 500, (1, n_new), generator=torch.Generator().manual_seed(2)).cuda()
    outs = []
    for graphed in (False, True):
        cache = stage.new_cache(1, 64)
        slot = cache.alloc()
        decoder = GraphedDecoder(stage, cache) if graphed else None
        with torch.inference_mode():
            stage(prompt, cache, cache.batch([slot], 11))
            batch = cache.batch([slot], n_new)
            out = decoder(step, batch) if decoder else stage(step, cache, batch)
            outs.append(out.float().cpu().clone())
            cache.rollback(slot, 11)  # drafts rejected: the next step overwrites them
            again = cache.batch([slot], 1)
            one = step[:, :1]
            outs.append((decoder(one, again) if decoder else stage(one, cache, again)).float().cpu().clone())
    assert outs[0].shape == outs[2].shape == (1, n_new, outs[0].shape[-1])
    assert (outs[0] - outs[2]).abs().max().item() < 1e-3
    assert (outs[1] - outs[3]).abs().max().item() < 1e-3
    assert (outs[1][0, 0] - outs[0][0, 0]).abs().max().item() < 1e-3  # the rollback kept the prompt's


def test_a_draft_model_on_cuda_drafts_the_greedy_continuation(tiny_model_dir) -> None:
    from peerpipe.engine.draft_model import DraftModel

    path = tiny_model_dir("llama", seed=4)
    engine, _ = LocalEngine.from_dir(path, device="cuda", dtype="float32", max_seq=64, cuda_graphs=False)
    prompt = [5, 17, 42, 99, 3]
    expected = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)).tokens
    draft = DraftModel(load_stage(path, device="cuda", dtype="float32")[0], sessions=1, max_seq=64, vocab_limit=10**9)
    session = draft.session(SamplingParams(temperature=0))
    assert session.propose(prompt, 3) == expected[:3]
    assert session.propose(prompt + expected[:2], 4) == expected[2:6]


def test_a_cuda_stage_attends_without_cudnn_and_as_a_cpu_does(tiny_model_dir) -> None:
    """cuDNN's attention plans every new shape first (bench/prompt_shapes.py): a CUDA stage turns
    it off, and prompts of grouped heads (expanded for memory-efficient attention) still give
    the CPU's numbers, batches of prompts at a cached prefix too."""
    path = tiny_model_dir("llama", seed=3)
    torch.backends.cuda.enable_cudnn_sdp(True)
    out = {}
    for device in ("cpu", "cuda"):
        stage, _ = load_stage(path, device=device, dtype="float32")
        assert stage.cfg.n_kv_heads < stage.cfg.n_heads  # grouped: the expanded path
        cache = stage.new_cache(3, 64)
        slots = [cache.alloc() for _ in range(3)]
        ids = torch.randint(0, 500, (3, 24), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.inference_mode():
            first = stage(ids[:, :11], cache, cache.batch(slots, 11)).float().cpu()
            rest = stage(ids[:, 11:], cache, cache.batch(slots, 13)).float().cpu()
        out[device] = torch.cat([first, rest], 1)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert (out["cpu"] - out["cuda"]).abs().max().item() < 5e-3
