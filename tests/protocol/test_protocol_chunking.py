"""split() and Reassembler: interleaving, reordering, duplicates, gaps, timeouts, limits."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from peerpipe import protocol as p

LIMITS = p.Limits(chunk_bytes=1000, chunk_timeout_s=5.0)


def ids(prefix: str) -> itertools.count[str]:
    return (f"{prefix}{i}" for i in itertools.count())  # type: ignore[return-value]


def result(task: str, nbytes: int, seed: int = 0) -> p.ComputeResult:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return p.ComputeResult(task, p.TensorData.from_numpy(data))


def wire(msgs: list[p.Message]) -> list[p.Message]:
    return [p.decode(p.encode(m), LIMITS) for m in msgs]


def test_small_messages_are_not_split() -> None:
    msg = result("t", 1000)
    assert p.split(msg, LIMITS) == [msg]
    assert p.split(p.Ping(1), LIMITS) == [p.Ping(1)]


def test_split_layout_and_placeholder() -> None:
    msg = result("t", 2500)
    parts = p.split(msg, LIMITS, new_id=lambda: "tid")
    chunks, last = parts[:-1], parts[-1]
    assert [(c.tensor_id, c.chunk_index, c.total_chunks, c.total_bytes, len(c.data)) for c in chunks] == [
        ("tid", 0, 3, 2500, 834),
        ("tid", 1, 3, 2500, 834),
        ("tid", 2, 3, 2500, 832),
    ]
    assert all(p.is_bulk(c) for c in parts)
    placeholder = last.output_tensor
    assert placeholder.is_placeholder and placeholder.ref == "tid" and placeholder.data == b""
    assert (placeholder.dtype, placeholder.shape, placeholder.checksum) == (
        "uint8",
        (2500,),
        msg.output_tensor.checksum,
    )
    assert b"".join(bytes(c.data) for c in chunks) == bytes(msg.output_tensor.data)
    # Chunks are views of the tensor, not copies.
    assert all(c.data.obj is msg.output_tensor.data.obj for c in chunks)


def test_split_refuses_too_many_chunks() -> None:
    with pytest.raises(p.ChunkError, match="chunks exceed"):
        p.split(result("t", 5000), p.Limits(chunk_bytes=1000, max_chunks=4))


def test_interleaved_out_of_order_with_control_messages() -> None:
    rng = random.Random(7)
    originals = [result(f"t{i}", 1000 * i + 123, seed=i) for i in range(1, 5)]
    make = ids("x")
    streams = [wire(p.split(m, LIMITS, new_id=lambda: next(make))) for m in originals]
    # Chunks of each tensor shuffled among themselves; the placeholder message stays after them.
    for stream in streams:
        body = stream[:-1]
        rng.shuffle(body)
        stream[:-1] = body
    merged: list[p.Message] = []
    cursors = [0] * len(streams)
    while any(c < len(s) for c, s in zip(cursors, streams, strict=True)):
        i = rng.choice([k for k, s in enumerate(streams) if cursors[k] < len(s)])
        merged.append(streams[i][cursors[i]])
        cursors[i] += 1
        if rng.random() < 0.3:
            merged.append(p.Heartbeat(load=0.5, status="busy"))
    reassembler = p.Reassembler(LIMITS)
    delivered = [out for m in merged if (out := reassembler.feed(m, 1.0)) is not None]
    results = {m.task_id: m for m in delivered if isinstance(m, p.ComputeResult)}
    assert results == {m.task_id: m for m in originals}
    for original in originals:
        np.testing.assert_array_equal(
            results[original.task_id].output_tensor.to_numpy(), original.output_tensor.to_numpy()
        )
    assert sum(isinstance(m, p.Heartbeat) for m in delivered) == sum(
        isinstance(m, p.Heartbeat) for m in merged
    )
    assert reassembler.pending_bytes == 0 and reassembler.pending_tensors == 0


def feed_all(reassembler: p.Reassembler, msgs: list[p.Message], now: float = 0.0) -> list[p.Message | None]:
    return [reassembler.feed(m, now) for m in msgs]


def test_duplicate_chunk_frees_the_tensor_and_later_chunks_are_refused() -> None:
    reassembler = p.Reassembler(LIMITS)
    other = p.split(result("o", 1500), LIMITS, new_id=lambda: "other")
    parts = p.split(result("t", 3000), LIMITS, new_id=lambda: "dup")
    feed_all(reassembler, [other[0], parts[0]])
    with pytest.raises(p.ChunkError, match="chunk 0 arrived twice") as info:
        reassembler.feed(parts[0], 0.0)
    assert info.value.tensor_id == "dup"
    assert reassembler.pending_bytes == 1500  # only the other tensor is left
    with pytest.raises(p.ChunkError, match="after the tensor was discarded"):
        reassembler.feed(parts[1], 0.0)
    with pytest.raises(p.ChunkError, match="refers to a tensor that was discarded"):
        reassembler.feed(parts[-1], 0.0)
    assert reassembler.pending_bytes == 1500
    assert feed_all(reassembler, other[1:])[-1] == result("o", 1500)
    assert reassembler.pending_bytes == 0


def test_chunk_after_delivery_is_refused() -> None:
    reassembler = p.Reassembler(LIMITS)
    parts = p.split(result("t", 3000), LIMITS, new_id=lambda: "late")
    feed_all(reassembler, parts)
    with pytest.raises(p.ChunkError, match="after the tensor was delivered"):
        reassembler.feed(parts[0], 0.0)
    assert reassembler.pending_bytes == 0


def test_gap_message_before_all_chunks() -> None:
    reassembler = p.Reassembler(LIMITS)
    parts = p.split(result("t", 3000), LIMITS, new_id=lambda: "gap")
    feed_all(reassembler, [parts[0], parts[2]])
    assert reassembler.pending_bytes == 3000
    with pytest.raises(p.ChunkError, match="1 of 3 chunks missing"):
        reassembler.feed(parts[-1], 0.0)
    assert reassembler.pending_bytes == 0 and reassembler.pending_tensors == 0


def test_placeholder_without_any_chunk() -> None:
    reassembler = p.Reassembler(LIMITS)
    parts = p.split(result("t", 3000), LIMITS, new_id=lambda: "none")
    with pytest.raises(p.ChunkError, match="never sent a chunk"):
        reassembler.feed(parts[-1], 0.0)


def test_inconsistent_totals() -> None:
    reassembler = p.Reassembler(LIMITS)
    reassembler.feed(p.TensorChunk("inc", 0, 3, 3000, b"x" * 1000), 0.0)
    with pytest.raises(p.ChunkError, match="earlier chunks said 3 chunks of 3000"):
        reassembler.feed(p.TensorChunk("inc", 1, 2, 2000, b"x" * 1000), 0.0)
    assert reassembler.pending_bytes == 0


def test_placeholder_size_disagrees_with_chunks() -> None:
    reassembler = p.Reassembler(LIMITS)
    reassembler.feed(p.TensorChunk("sz", 0, 2, 2000, b"x" * 1000), 0.0)
    reassembler.feed(p.TensorChunk("sz", 1, 2, 2000, b"x" * 1000), 0.0)
    placeholder = p.TensorData("uint8", (1999,), checksum=0, ref="sz")
    with pytest.raises(p.ChunkError, match="1999 bytes but its chunks hold 2000"):
        reassembler.feed(p.ComputeResult("t", placeholder), 0.0)
    assert reassembler.pending_bytes == 0


def test_corrupt_reassembled_tensor_raises_checksum_error() -> None:
    reassembler = p.Reassembler(LIMITS)
    parts = p.split(result("t", 3000), LIMITS, new_id=lambda: "crc")
    bad = parts[1]
    assert isinstance(bad, p.TensorChunk)
    parts[1] = p.TensorChunk(
        bad.tensor_id, bad.chunk_index, bad.total_chunks, bad.total_bytes, b"\0" * len(bad.data)
    )
    with pytest.raises(p.ChecksumError, match="corrupt") as info:
        feed_all(reassembler, parts)
    assert isinstance(info.value, p.ChunkError) and info.value.tensor_id == "crc"
    assert reassembler.pending_bytes == 0


def test_timeout_expiry_counts_from_last_progress() -> None:
    reassembler = p.Reassembler(LIMITS)
    slow = p.split(result("s", 3000), LIMITS, new_id=lambda: "slow")
    fresh = p.split(result("f", 3000), LIMITS, new_id=lambda: "fresh")
    reassembler.feed(slow[0], 0.0)
    reassembler.feed(fresh[0], 0.0)
    reassembler.feed(fresh[1], 4.0)
    assert reassembler.expire(5.0) == []
    errors = reassembler.expire(5.5)
    assert [e.tensor_id for e in errors] == ["slow"]
    assert "2 of 3 chunks missing" in str(errors[0])
    assert reassembler.pending_bytes == 3000
    with pytest.raises(p.ChunkError, match="timed out"):
        reassembler.feed(slow[1], 5.6)
    assert feed_all(reassembler, fresh[2:], 6.0)[-1] == result("f", 3000)
    assert reassembler.pending_bytes == 0


def test_pending_tensor_and_byte_limits() -> None:
    limits = p.Limits(chunk_bytes=1000, max_pending_tensors=2, max_pending_bytes=5000)
    reassembler = p.Reassembler(limits)
    reassembler.feed(p.TensorChunk("a", 0, 2, 2000, b"x" * 1000), 0.0)
    reassembler.feed(p.TensorChunk("b", 0, 2, 2000, b"x" * 1000), 0.0)
    with pytest.raises(p.ChunkError, match="more than 2 tensors"):
        reassembler.feed(p.TensorChunk("c", 0, 2, 2000, b"x" * 1000), 0.0)
    assert reassembler.pending_bytes == 4000
    reassembler = p.Reassembler(limits)
    reassembler.feed(p.TensorChunk("a", 0, 4, 4000, b"x" * 1000), 0.0)
    with pytest.raises(p.ChunkError, match="exceed 5000 bytes"):
        reassembler.feed(p.TensorChunk("b", 0, 2, 2000, b"x" * 1000), 0.0)
    assert reassembler.pending_bytes == 4000
    with pytest.raises(p.ChunkError, match="chunks exceed the limit"):
        p.Reassembler(p.Limits(max_chunks=2)).feed(p.TensorChunk("c", 0, 3, 3, b"x"), 0.0)


def test_reassembled_tensor_is_writable_numpy() -> None:
    reassembler = p.Reassembler(LIMITS)
    arr = np.arange(1000, dtype=np.float32)
    msg = p.ComputeRequest("t", p.TensorData.from_numpy(arr.reshape(1, -1)), session_id="s", start_pos=7)
    out = feed_all(reassembler, wire(p.split(msg, LIMITS)))[-1]
    assert isinstance(out, p.ComputeRequest) and out == msg
    back = out.input_tensor.to_numpy()
    np.testing.assert_array_equal(back, arr.reshape(1, -1))
    assert back.flags.writeable
