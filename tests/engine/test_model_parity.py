"""The engine computes what transformers computes, whole or split into stages."""

from __future__ import annotations

import itertools

import pytest
import torch

from peerpipe.devtools.tiny_model import ARCHITECTURES
from peerpipe.engine.loader import load_stage
from peerpipe.engine.model import Stage

transformers = pytest.importorskip("transformers")

# Random configs beyond the defaults: odd GQA ratios, explicit head_dim, untied/tied heads.
VARIANTS = [
    ("llama", {}),
    ("llama", {"num_attention_heads": 6, "num_key_value_heads": 1, "hidden_size": 96}),
    ("llama", {"num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": True}),
    ("llama3", {}),
    ("qwen2", {"num_attention_heads": 8, "num_key_value_heads": 2}),
    ("qwen2", {"tie_word_embeddings": False}),
    ("qwen3", {}),
    ("qwen3", {"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 48}),
    ("mistral", {}),
    ("mistral", {"sliding_window": 7}),
]


def _reference(path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def _run_whole(stage: Stage, ids: torch.Tensor) -> torch.Tensor:
    cache = stage.new_cache(max_slots=1, max_seq=ids.shape[1])
    slot = cache.alloc()
    with torch.inference_mode():
        return stage(ids, cache, cache.batch([slot], ids.shape[1]))


@pytest.mark.parametrize(
    ("arch", "overrides"), VARIANTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(VARIANTS)]
)
def test_logits_match_transformers(tiny_model_dir, arch: str, overrides: dict) -> None:
    path = tiny_model_dir(arch, config_overrides=overrides, seed=3)
    stage, _ = load_stage(path, device="cpu", dtype="float32")
    ids = torch.randint(0, stage.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _reference(path)(ids).logits
    # Two sessions in one batch, each in its own slot.
    cache = stage.new_cache(max_slots=2, max_seq=32)
    slots = [cache.alloc(), cache.alloc()]
    with torch.inference_mode():
        ours = stage(ids, cache, cache.batch(slots, ids.shape[1]))
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_continuation_matches_transformers(tiny_model_dir, arch: str) -> None:
    path = tiny_model_dir(arch, seed=5)
    stage, _ = load_stage(path, device="cpu", dtype="float32")
    prompt = torch.tensor([[0, 17, 42, 99, 7, 300]])
    ref_model = _reference(path)
    with torch.no_grad():
        ref = ref_model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            pad_token_id=1,
            eos_token_id=None,
        )[0, prompt.shape[1] :].tolist()
    cache = stage.new_cache(max_slots=1, max_seq=64)
    slot = cache.alloc()
    out: list[int] = []
    x = prompt
    with torch.inference_mode():
        for _ in range(32):
            logits = stage(x, cache, cache.batch([slot], x.shape[1]), last_only=True)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    assert out == ref


@pytest.mark.parametrize(
    ("arch", "cuts"), [("llama", (2,)), ("qwen3", (1, 3)), ("mistral", (1, 2)), ("qwen2", (3,))]
)
def test_stages_chained_equal_whole_model(tiny_model_dir, arch: str, cuts: tuple[int, ...]) -> None:
    path = tiny_model_dir(arch, seed=7, shards=3)
    whole, _ = load_stage(path, device="cpu", dtype="float32")
    ids = torch.randint(0, whole.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    expected = _run_whole(whole, ids)
    bounds = [0, *cuts, whole.cfg.n_layers]
    x = ids
    for start, end in itertools.pairwise(bounds):
        stage, _ = load_stage(path, start, end, device="cpu", dtype="float32")
        assert stage.is_first == (start == 0) and stage.is_last == (end == whole.cfg.n_layers)
        x = _run_whole(stage, x)
    assert torch.equal(x, expected)


def test_half_precision_close_to_float32(tiny_model_dir) -> None:
    path = tiny_model_dir("llama", seed=9, dtype="bfloat16")
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(3))
    full, _ = load_stage(path, device="cpu", dtype="float32")
    half, _ = load_stage(path, device="cpu", dtype="bfloat16")
    assert half.embed.weight.dtype == torch.bfloat16
    a, b = _run_whole(full, ids), _run_whole(half, ids).float()
    assert torch.linalg.norm(a - b) / torch.linalg.norm(a) < 3e-2


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compiled_layers_compute_what_eager_layers_do(tiny_model_dir, arch: str) -> None:
    # The compiled layer rotates queries and keys out of place (engine/model.py): a prefill and
    # two decode steps through it must give the eager layer's logits and cache.
    from peerpipe.engine.model import layer_forward

    path = tiny_model_dir(arch, seed=5)
    stage, _ = load_stage(path, device="cpu", dtype="float32")
    compiled = torch.compile(layer_forward, dynamic=False)
    ids = torch.randint(0, stage.cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    runs = []
    for layer_fn in (None, compiled):
        cache = stage.new_cache(max_slots=1, max_seq=16)
        slot = cache.alloc()
        with torch.inference_mode():
            logits = [stage(ids[:, :7], cache, cache.batch([slot], 7), layer_fn=layer_fn)[:, -1]]
            for t in (7, 8):
                logits.append(stage(ids[:, t : t + 1], cache, cache.batch([slot], 1), layer_fn=layer_fn)[:, -1])
        runs.append((torch.cat(logits), cache.layers[0][slot, :9].clone()))
    (eager, eager_kv), (comp, comp_kv) = runs
    assert (eager - comp).abs().max().item() <= 1e-4
    assert (eager_kv - comp_kv).abs().max().item() <= 1e-5
