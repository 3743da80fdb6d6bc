"""Random and mutated input never crashes decode or Reassembler: only ProtocolError comes out.

Any other exception (or a hang) is a bug in peerpipe.
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_strategies import messages

from peerpipe import protocol as p

LIMITS = p.Limits(chunk_bytes=64, max_pending_tensors=8, max_pending_bytes=4096, chunk_timeout_s=1.0)
NODE = p.NodeInfo("n1", "laptop", "cuda", 8 << 30, 20.0)


def seed_messages() -> list[p.Message]:
    tensor = p.TensorData.from_numpy(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    return [
        p.Hello(1, "node-a", "Desk", "peerpipe 0.1", ("chunks",)),
        p.Ping(12345),
        p.Pong(1 << 63),
        p.Bye("shutting down"),
        p.JoinCluster(NODE),
        p.LeaveCluster("node-b"),
        p.Heartbeat(0.25, "busy"),
        p.RoomView(3, (p.MemberState(NODE), p.MemberState(p.NodeInfo("n2", "pi", "cpu", 1 << 30, 0.1)))),
        p.DistributionPlan(p.Plan(2, "llama", 8, (p.PlanStage("n1", 0, 5), p.PlanStage("n2", 5, 8)), 12.5)),
        p.PlanAck(2, False, "out of memory"),
        p.BenchmarkRequest(9),
        p.BenchmarkResult(0.5, 9, 20.0, 300.0, 1.2),
        p.ComputeRequest("task-1", tensor, "sess", 2, 17),
        p.ComputeResult("task-1", p.TensorData("int64", (2,), b"\1" * 16)),
        p.ComputeError("task-1", "CUDA out of memory"),
        p.Cancel("task-1"),
        p.TensorChunk("tid", 1, 3, 200, b"z" * 67),
    ]


SEEDS = [p.encode(m) for m in seed_messages()]
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1 << 63, (1 << 64) - 1, -(1 << 63), 1.5, math.nan, math.inf, "", "x" * 300,
    "float32", "raw", [], [1, 2], [[[]]], {}, {"a": 1}, {"offset": 0, "nbytes": 1}, b"bin",
]  # fmt: skip


def _mutate_header(body: bytes, rng: random.Random) -> bytes:
    """Structure-aware mutation: replace, drop or add one entry somewhere in the msgpack header."""
    try:
        (size,) = struct.unpack_from(">I", body)
        header = msgpack.unpackb(body[4 : 4 + size], raw=False, strict_map_key=False)
    except Exception:  # an earlier mutation already broke the header; damage it byte-wise instead
        return _flip_bits(body, rng)
    containers: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, (dict, list)):
            containers.append(node)
            for child in node.values() if isinstance(node, dict) else node:
                walk(child)

    walk(header)
    if not containers:
        return _flip_bits(body, rng)
    target = rng.choice(containers)
    action = rng.random()
    if isinstance(target, dict):
        key = rng.choice(list(target)) if target else "k"
        if action < 0.7:
            target[key] = rng.choice(ODD_VALUES)
        elif action < 0.85:
            target.pop(key, None)
        else:
            target[rng.choice(["extra", "tag", "fields", "dtype", "ref"])] = rng.choice(ODD_VALUES)
    elif target:
        target[rng.randrange(len(target))] = rng.choice(ODD_VALUES)
    else:
        target.append(rng.choice(ODD_VALUES))
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed + body[4 + size :]


def _flip_bits(body: bytes, rng: random.Random) -> bytes:
    out = bytearray(body)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _set_bytes(body: bytes, rng: random.Random) -> bytes:
    out = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] = rng.choice(
            [0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xDC, 0xDD, 0xDE, 0xDF, 0xCF]
        )
    return bytes(out)


def _truncate(body: bytes, rng: random.Random) -> bytes:
    return body[: rng.randrange(len(body))]


def _extend(body: bytes, rng: random.Random) -> bytes:
    return body + rng.randbytes(rng.randint(1, 64))


def _splice(body: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(body))
    return body[:i] + rng.randbytes(rng.randint(0, 16)) + body[i + rng.randint(0, 16) :]


def _header_len(body: bytes, rng: random.Random) -> bytes:
    size = rng.choice([0, 1, len(body), len(body) - 4, len(body) + 1, 0xFFFFFFFF, rng.randrange(1 << 32)])
    if rng.random() < 0.5 and len(body) >= 4:
        (old,) = struct.unpack_from(">I", body)
        size = old + rng.randint(-3, 3)
    return struct.pack(">I", min(0xFFFFFFFF, max(0, size))) + body[4:]


def _random_bytes(body: bytes, rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(0, 64))


MUTATORS: list[Callable[[bytes, random.Random], bytes]] = [
    _mutate_header, _flip_bits, _set_bytes, _truncate, _extend, _splice, _header_len, _random_bytes,
]  # fmt: skip


def _check_decode(body: bytes) -> p.Message | None:
    try:
        return p.decode(body, LIMITS)
    except p.ProtocolError:
        return None


def _run(count: int, seed: int) -> dict[str, int]:
    """Feed ``count`` mutated frames to decode and every decoded message to a Reassembler."""
    rng = random.Random(seed)
    reassembler = p.Reassembler(LIMITS)
    stats = {"decoded": 0, "rejected": 0, "chunk_errors": 0}
    now = 0.0
    for _ in range(count):
        body = rng.choice(SEEDS)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            body = rng.choice(MUTATORS)(body, rng) or b"\0"
        msg = _check_decode(body)
        if msg is None:
            stats["rejected"] += 1
            continue
        stats["decoded"] += 1
        now += 0.01
        try:
            reassembler.feed(msg, now)
        except p.ChunkError:
            stats["chunk_errors"] += 1
        reassembler.expire(now)
        assert 0 <= reassembler.pending_bytes <= LIMITS.max_pending_bytes
    reassembler.expire(math.inf)
    assert reassembler.pending_bytes == 0
    return stats


def test_mutated_frames_quick() -> None:
    stats = _run(10_000, seed=1)
    # Most mutations must be caught, but some (e.g. within a string) legitimately decode.
    assert stats["decoded"] > 50 and stats["rejected"] > 5000


@pytest.mark.slow
def test_mutated_frames_200k() -> None:
    start = time.monotonic()
    stats = _run(200_000, seed=2)
    assert stats["decoded"] + stats["rejected"] == 200_000
    assert time.monotonic() - start < 60


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes(body: bytes) -> None:
    _check_decode(body)


@settings(max_examples=300, deadline=None)
@given(msg=messages, data=st.data())
def test_mutated_generated_messages(msg: p.Message, data: st.DataObject) -> None:
    rng = random.Random(data.draw(st.integers(0, 1 << 32)))
    body = p.encode(msg)
    mutator = data.draw(st.sampled_from(MUTATORS))
    _check_decode(mutator(body, rng) or b"\0")


@st.composite
def chunk_streams(draw: st.DrawFn) -> list[p.Message]:
    """Chunk streams of a few tensors, then reordered, duplicated, dropped or retargeted."""
    stream: list[p.Message] = []
    for i in range(draw(st.integers(1, 3))):
        nbytes = draw(st.integers(1, 400))
        msg = p.ComputeResult(f"t{i}", _bytes(nbytes))
        stream += p.split(msg, LIMITS, new_id=lambda i=i: f"id{i}")
    ops = draw(
        st.lists(st.tuples(st.sampled_from("sdmx"), st.integers(0, 1000), st.integers(0, 1000)), max_size=8)
    )
    for op, a, b in ops:
        a %= len(stream)
        b %= len(stream)
        if op == "s":
            stream[a], stream[b] = stream[b], stream[a]
        elif op == "d":
            stream.insert(b, stream[a])
        elif op == "m" and len(stream) > 1:
            del stream[a]
        elif op == "x":
            target = stream[a]
            if isinstance(target, p.TensorChunk):
                stream[a] = p.TensorChunk(
                    f"id{b % 3}", target.chunk_index, target.total_chunks, target.total_bytes, target.data
                )
    return stream


def _bytes(n: int) -> p.TensorData:
    return p.TensorData("uint8", (n,), bytes(i % 251 for i in range(n)))


@settings(max_examples=300, deadline=None)
@given(stream=chunk_streams())
def test_reassembler_on_damaged_chunk_streams(stream: list[p.Message]) -> None:
    reassembler = p.Reassembler(LIMITS)
    for now, msg in enumerate(stream):
        try:
            out = reassembler.feed(msg, float(now))
        except p.ChunkError as exc:
            assert exc.tensor_id is not None
            continue
        if isinstance(out, p.ComputeResult):
            # Whatever got through must be exactly what was sent: damage is caught, never delivered.
            assert out == p.ComputeResult(out.task_id, _bytes(out.output_tensor.nbytes))
        assert reassembler.pending_bytes >= 0
    pending = reassembler.pending_tensors
    assert len(reassembler.expire(math.inf)) == pending
    assert reassembler.pending_bytes == 0 and reassembler.pending_tensors == 0
