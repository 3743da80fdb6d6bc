"""The one-kernel decode attention (engine/attention_cuda.py): how it splits positions anywhere,
and on CUDA its output against float attention over a cache laid out as KVCache lays it out
(skipped without a GPU and Triton)."""

from __future__ import annotations

import pytest
import torch

from peerpipe.engine import attention_cuda, int8_gluon


@pytest.mark.parametrize(("programs", "length", "g", "d"), [
    (8, 64, 4, 64), (8, 256, 4, 64), (8, 1024, 4, 128), (8, 8192, 4, 128), (1, 4096, 8, 128), (64, 2048, 4, 128),
    (512, 4096, 8, 128), (2, 131072, 64, 256),
])
def test_positions_split_while_the_gpu_has_room_and_the_partials_fit(programs: int, length: int, g: int, d: int) -> None:
    split = attention_cuda.splits(programs, length, g, d)
    assert split & (split - 1) == 0 and 1 <= split <= attention_cuda.MAX_SPLITS
    assert programs * split <= max(programs, attention_cuda.TARGET_PROGRAMS)
    if split > 1:
        assert length >= split * attention_cuda.BLOCK_L  # each program keeps a block or more
        assert programs * split * attention_cuda._pad(g) * (d + 2) <= int8_gluon.WORKSPACE_FLOATS
        assert programs <= int8_gluon.COUNTERS
    if programs >= attention_cuda.TARGET_PROGRAMS or length < 2 * attention_cuda.BLOCK_L:
        assert split == 1
    if (programs, length) == (8, 256):
        assert split == 4  # the 1B shape's first buckets: a block per program


def _cache_views(b: int, length: int, kv: int, d: int, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    store = torch.randn(b, length, 2, kv, d, device="cuda", dtype=dtype)  # KVCache's [B, L, 2, KV, D]
    return store.select(2, 0).transpose(1, 2), store.select(2, 1).transpose(1, 2)


def _mask(lengths: list[int], length: int, dtype: torch.dtype) -> torch.Tensor:
    allowed = torch.arange(length, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    mask = torch.zeros(len(lengths), length, device="cuda", dtype=dtype)
    return mask.masked_fill_(~allowed, float("-inf"))[:, None, None, :]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask.double()
    return scores.softmax(-1) @ v.double()


cuda_triton = pytest.mark.skipif(
    not torch.cuda.is_available() or not attention_cuda.prepare(torch.device("cuda")), reason="needs CUDA and Triton"
)


@cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("b", "kv", "g", "d", "length"), [
    (1, 8, 4, 64, 256), (1, 8, 4, 128, 1024), (2, 2, 3, 64, 130), (3, 8, 4, 64, 64), (1, 1, 16, 128, 4096),
    (16, 8, 4, 128, 512),
])
def test_the_kernel_attends_as_float64_does(dtype: torch.dtype, b: int, kv: int, g: int, d: int, length: int) -> None:
    torch.manual_seed(b * 1000 + length)
    keys, values = _cache_views(b, length, kv, d, dtype)
    qkv = torch.randn(b, 1, kv * g + 2 * kv, d, device="cuda", dtype=dtype)
    q = qkv.narrow(2, 0, kv * g).view(b, kv, g, d)  # as a layer takes it from its q|k|v product
    mask = _mask([max(1, length - 37 * i) for i in range(b)], length, dtype)
    assert attention_cuda.fits(q, keys, values, mask)
    got = attention_cuda.decode_attention(q, keys, values, mask, d**-0.5)
    want = _reference(q, keys, values, mask)
    assert (got.double() - want).abs().max() < 2e-2


@cuda_triton
def test_split_calls_in_one_graph_replay_what_they_compute_launched_alone() -> None:
    torch.manual_seed(0)
    keys, values = _cache_views(1, 2048, 8, 128, torch.bfloat16)
    q = torch.randn(1, 8, 4, 128, device="cuda", dtype=torch.bfloat16)
    mask = _mask([1500], 2048, torch.bfloat16)
    assert attention_cuda.splits(8, 2048, 4, 128) > 1

    def layers() -> torch.Tensor:
        out = q
        for _ in range(4):
            out = attention_cuda.decode_attention(out, keys, values, mask, 128**-0.5) * 8
        return out

    want = layers()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layers()
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(out, want)


@cuda_triton
def test_a_compiled_function_calls_the_kernel_as_one_operation() -> None:
    keys, values = _cache_views(1, 256, 8, 64, torch.bfloat16)
    q = torch.randn(1, 8, 4, 64, device="cuda", dtype=torch.bfloat16)
    mask = _mask([200], 256, torch.bfloat16)
    fn = torch.compile(lambda a: attention_cuda.decode_attention(a * 2, keys, values, mask, 0.125), fullgraph=True)
    assert (fn(q).double() - _reference(q * 2, keys, values, mask)).abs().max() < 2e-2


def _rotate(t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs rotated in float32 and rounded back, as model._apply_rope does."""
    pairs = torch.view_as_complex(t.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope).flatten(-2).to(t.dtype)


@cuda_triton
@pytest.mark.parametrize(("kv", "g", "d", "kv_len", "slots", "positions", "window"), [
    (8, 4, 64, 256, [0], [200], 0),  # the 1B shape, one session in its own slot
    (8, 4, 128, 1024, [3, 1], [1023, 64], 0),  # scattered slots, read in place
    (2, 3, 64, 64, [1], [0], 0),  # the first position
    (2, 4, 64, 512, [2, 2], [130, 600], 0),  # a padding row aimed past the span writes nothing
    (4, 2, 128, 512, [0], [400], 100),  # a sliding window
])
def test_a_decode_step_rotates_stores_and_attends(kv: int, g: int, d: int, kv_len: int, slots: list[int],
                                                  positions: list[int], window: int) -> None:
    torch.manual_seed(kv_len + len(slots))
    dtype, h, b = torch.bfloat16, kv * g, len(slots)
    # KVCache's layer [slots, positions, 2, KV, D]
    store = torch.randn(4, max(kv_len, max(positions) + 1), 2, kv, d, device="cuda", dtype=dtype)
    qkv = torch.randn(b, 1, h + 2 * kv, d, device="cuda", dtype=dtype)
    pos = torch.tensor(positions, device="cuda")
    freqs = pos[:, None].float() * torch.rand(d // 2, device="cuda")[None, :]
    rope = torch.polar(torch.ones_like(freqs), freqs)[:, None, None, :]
    want_store = store.clone()
    q = _rotate(qkv[:, 0, :h], rope[:, 0])
    new = torch.stack((_rotate(qkv[:, 0, h:h + kv], rope[:, 0]), qkv[:, 0, h + kv:]), 1)  # [B, 2, KV, D]
    for i, (slot, p) in enumerate(zip(slots, positions, strict=True)):
        if p < kv_len:
            want_store[slot, p] = new[i]
    got = attention_cuda.decode_step(qkv, rope, store, torch.tensor(slots, device="cuda"), pos[:, None], kv_len,
                                     h, window, d**-0.5)
    assert torch.equal(store, want_store)  # the new key (rotated) and value, nothing else
    for i, (slot, p) in enumerate(zip(slots, positions, strict=True)):
        seen = torch.arange(kv_len, device="cuda") <= p
        if window:
            seen &= torch.arange(kv_len, device="cuda") > p - window
        mask = torch.zeros(kv_len, device="cuda").masked_fill_(~seen, float("-inf"))
        keys = want_store[slot, :kv_len, 0].transpose(0, 1)[None]  # [1, KV, L, D]
        values = want_store[slot, :kv_len, 1].transpose(0, 1)[None]
        want = _reference(q[i].view(1, kv, g, d), keys, values, mask[None, None, None, :])
        assert (got[i : i + 1].double() - want).abs().max() < 2e-2


@cuda_triton
def test_a_compiled_layer_steps_the_cache_in_place() -> None:
    torch.manual_seed(0)
    store = torch.randn(2, 65, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
    eager_store = store.clone()
    qkv = torch.randn(1, 1, 48, 64, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(1, 1, 1, 32, device="cuda")
    rope = torch.polar(torch.ones_like(angles), angles)
    slots, pos = torch.ones(1, dtype=torch.long, device="cuda"), torch.full((1, 1), 5, device="cuda")

    def step(a: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        return attention_cuda.decode_step(a * 2, rope, cache, slots, pos, 64, 32, 0, 0.125)

    out = torch.compile(step, fullgraph=True)(qkv, store)
    want = step(qkv, eager_store)
    assert torch.equal(out, want) and torch.equal(store, eager_store)  # the write reached the cache itself
    assert not torch.equal(store[1, 5], store.new_zeros(2, 8, 64)) and torch.equal(store[1, 5, 1], qkv[0, 0, 40:] * 2)
