"""KV-cache exactness: cached decode, rollback and mixed-length batches equal recomputation."""

from __future__ import annotations

import pytest
import torch

from peerpipe.engine.errors import CacheError
from peerpipe.engine.loader import load_stage
from peerpipe.engine.model import Stage


@pytest.fixture(scope="module", params=["llama", "qwen3", "mistral"])
def stage(request, tiny_model_dir) -> Stage:
    overrides = {"sliding_window": 6} if request.param == "mistral" else {}
    stage, _ = load_stage(tiny_model_dir(request.param, seed=11, config_overrides=overrides), device="cpu")
    return stage


def _full(stage: Stage, ids: list[int]) -> torch.Tensor:
    """Logits of the last position, recomputed from scratch with a fresh cache."""
    cache = stage.new_cache(1, len(ids))
    slot = cache.alloc()
    with torch.inference_mode():
        return stage(torch.tensor([ids]), cache, cache.batch([slot], len(ids)))[0, -1]


def _step(stage: Stage, cache, slot: int, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return stage(torch.tensor([ids]), cache, cache.batch([slot], len(ids)))[0, -1]


def test_cached_decode_equals_recomputation_every_step(stage: Stage) -> None:
    ids = [5, 9, 100, 42]
    cache = stage.new_cache(2, 64)
    slot = cache.alloc()
    logits = _step(stage, cache, slot, ids)
    for _ in range(20):
        torch.testing.assert_close(logits, _full(stage, ids), rtol=0, atol=1e-5)
        ids.append(int(logits.argmax()))
        logits = _step(stage, cache, slot, ids[-1:])


def test_k_new_positions_at_once_equal_one_by_one(stage: Stage) -> None:
    prompt, draft = [3, 4, 5, 6], [70, 71, 72]
    cache = stage.new_cache(2, 32)
    a, b = cache.alloc(), cache.alloc()
    _step(stage, cache, a, prompt)
    _step(stage, cache, b, prompt)
    with torch.inference_mode():
        together = stage(torch.tensor([draft]), cache, cache.batch([a], 3))[0]
    singly = torch.stack([_step(stage, cache, b, [t]) for t in draft])
    torch.testing.assert_close(together, singly, rtol=0, atol=1e-5)


def test_rollback_then_redecode_equals_never_decoded(stage: Stage) -> None:
    prompt = [1, 2, 3, 4, 5]
    cache = stage.new_cache(1, 32)
    slot = cache.alloc()
    _step(stage, cache, slot, prompt)
    _step(stage, cache, slot, [77, 78, 79])  # tokens we then reject
    cache.rollback(slot, len(prompt))
    assert cache.lengths[slot] == len(prompt)
    got = _step(stage, cache, slot, [200])
    torch.testing.assert_close(got, _full(stage, [*prompt, 200]), rtol=0, atol=1e-5)


def test_batch_of_different_lengths_equals_each_alone(stage: Stage) -> None:
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [42]]
    cache = stage.new_cache(4, 32)
    slots = [cache.alloc() for _ in prompts]
    for slot, p in zip(slots, prompts, strict=True):
        _step(stage, cache, slot, p)
    histories = [list(p) for p in prompts]
    nxt = [[10], [11], [12]]
    # Decode three steps for all sessions at once; a non-contiguous slot order exercises gathering.
    order = [2, 0, 1]
    for _ in range(3):
        with torch.inference_mode():
            x = torch.tensor([nxt[i] for i in order])
            logits = stage(x, cache, cache.batch([slots[i] for i in order], 1))[:, -1]
        for row, i in enumerate(order):
            histories[i].append(nxt[i][0])
            torch.testing.assert_close(logits[row], _full(stage, histories[i]), rtol=0, atol=1e-5)
            nxt[i] = [int(logits[row].argmax())]


def test_cache_refuses_what_does_not_fit(stage: Stage) -> None:
    cache = stage.new_cache(1, 8)
    slot = cache.alloc()
    with pytest.raises(CacheError, match="slots are in use"):
        cache.alloc()
    with pytest.raises(CacheError, match="cache holds 8"):
        cache.batch([slot], 9)
    with pytest.raises(CacheError, match="roll"):
        cache.rollback(slot, 3)
    cache.free(slot)
    with pytest.raises(CacheError, match="not an allocated"):
        cache.batch([slot], 1)


def test_k_new_positions_for_sessions_of_different_lengths(stage: Stage) -> None:
    prompts, drafts = [[1, 2, 3, 4, 5, 6], [9, 8]], [[30, 31, 32], [40, 41, 42]]
    cache = stage.new_cache(2, 32)
    slots = [cache.alloc(), cache.alloc()]
    for slot, p in zip(slots, prompts, strict=True):
        _step(stage, cache, slot, p)
    with torch.inference_mode():
        out = stage(torch.tensor(drafts), cache, cache.batch(slots, 3))  # [2, 3, V]
    for row, (p, dr) in enumerate(zip(prompts, drafts, strict=True)):
        for j in range(3):
            torch.testing.assert_close(out[row, j], _full(stage, p + dr[: j + 1]), rtol=0, atol=1e-5)


def test_decode_across_kv_buckets_equals_recomputation(stage: Stage) -> None:
    """Decode reads whole 64-position buckets through cached views; crossing buckets stays exact."""
    ids = list(range(3, 60))
    cache = stage.new_cache(1, 160)
    slot = cache.alloc()
    logits = _step(stage, cache, slot, ids)
    for _ in range(75):  # positions 57 .. 131: three buckets
        ids.append(int(logits.argmax()))
        logits = _step(stage, cache, slot, ids[-1:])
    torch.testing.assert_close(logits, _full(stage, ids), rtol=0, atol=1e-5)
