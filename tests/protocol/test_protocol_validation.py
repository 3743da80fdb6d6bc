"""Bad fields, malformed frames and limits raise typed errors that say what was wrong."""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import msgpack
import pytest

from peerpipe import protocol as p
from peerpipe.errors import PeerpipeError

GiB = 1 << 30


def frame(header: Any, tail: bytes = b"", header_len: int | None = None) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    size = len(packed) if header_len is None else header_len
    return struct.pack(">I", size) + packed + tail


def tensor_meta(**over: Any) -> dict[str, Any]:
    meta = {
        "dtype": "uint8",
        "shape": [3],
        "encoding": "raw",
        "nbytes": 3,
        "checksum": 0,
        "offset": 0,
        "ref": None,
    }
    meta.update(over)
    return meta


NODE = p.NodeInfo("n1", "laptop", "cpu", 1 << 30, 1.5)


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: p.Heartbeat(load=1.5, status="idle"), "load"),
        (lambda: p.Heartbeat(load=-0.1, status="idle"), "load"),
        (lambda: p.Heartbeat(load=float("nan"), status="idle"), "load"),
        (lambda: p.Heartbeat(load=0.5, status="sleepy"), "status"),
        (lambda: p.Heartbeat(load=True, status="idle"), "load"),
        (lambda: p.Heartbeat(load=10**400, status="idle"), "load"),
        (lambda: p.Heartbeat(load=0.5, status=["idle"]), "status"),
        (lambda: p.LeaveCluster(peer_id=""), "peer_id"),
        (lambda: p.LeaveCluster(peer_id="x" * 129), "peer_id"),
        (lambda: p.Cancel(task_id=""), "task_id"),
        (lambda: p.ComputeError(task_id="t", error="x" * 5000), "error"),
        (lambda: p.Ping(nonce=-1), "nonce"),
        (lambda: p.Ping(nonce=1 << 64), "nonce"),
        (lambda: p.Hello(protocol_version=0, node_id="n", name="a"), "protocol_version"),
        (lambda: p.Hello(protocol_version=1, node_id="n", name="a", features=("",)), "features"),
        (lambda: p.NodeInfo("", "a", "cpu", 0, 0.0), "node_id"),
        (lambda: p.NodeInfo("n", "a", "cpu", -1, 0.0), "memory_bytes"),
        (lambda: p.NodeInfo("n", "a", "cpu", 0, float("inf")), "tflops"),
        (lambda: p.JoinCluster(node_info="n1"), "node_info"),
        (lambda: p.RoomView(epoch=1, members=(p.MemberState(NODE), p.MemberState(NODE))), "twice"),
        (lambda: p.PlanStage("n", 3, 3), "empty"),
        (lambda: p.Plan(1, "m", 4, (p.PlanStage("a", 0, 2), p.PlanStage("b", 3, 4))), "gap"),
        (lambda: p.Plan(1, "m", 5, (p.PlanStage("a", 0, 2), p.PlanStage("b", 2, 4))), "end at layer 4"),
        (lambda: p.Plan(1, "m", 4, (p.PlanStage("a", 0, 4),), standbys=(p.PlanStage("b", 0, 2),)), "no stage's range"),
        (lambda: p.Plan(1, "m", 4, (p.PlanStage("a", 0, 4),), standbys=(p.PlanStage("a", 0, 4),)), "already holds"),
        (lambda: p.Plan(1, "m", 4, ()), "empty"),
        (lambda: p.TensorData("float64", (1,), b"x" * 8), "dtype"),
        (lambda: p.TensorData("uint8", (2,), b"x"), "needs 2 bytes"),
        (lambda: p.TensorData("uint8", (-1,), b""), "dimension"),
        (lambda: p.TensorData("uint8", (1,), b"x", encoding="zstd"), "encoding"),
        (lambda: p.TensorData("uint8", (1,), b"x", ref="r"), "placeholder"),
        (lambda: p.TensorData("uint8", (1,), b"", ref="r"), "checksum"),
        (lambda: p.TensorData("uint8", (1,), b"x", checksum=1 << 32), "checksum"),
        (lambda: p.TensorChunk("t", 2, 2, 10, b"x"), "chunk_index"),
        (lambda: p.TensorChunk("t", 0, 2, 10, b"x"), "carry 5 bytes"),
        (lambda: p.TensorChunk("t", 0, 6, 10, b"xx"), "cannot be cut"),
        (lambda: p.ComputeRequest("t", b"raw"), "input_tensor"),
    ],
)
def test_invalid_fields_raise_validation_error(build: Any, needle: str) -> None:
    with pytest.raises(p.ValidationError, match=needle) as info:
        build()
    assert isinstance(info.value, p.ProtocolError) and isinstance(info.value, PeerpipeError)


def test_ints_are_accepted_for_float_fields_and_stored_as_float() -> None:
    beat = p.Heartbeat(load=1, status="busy")
    assert type(beat.load) is float
    assert p.decode(p.encode(beat)) == beat


def test_check_hello() -> None:
    p.check_hello(p.Hello(p.PROTOCOL_VERSION, "n", "a"))
    future = p.decode(p.encode(p.Hello(p.PROTOCOL_VERSION + 1, "n", "desk")))
    newer = p.PROTOCOL_VERSION + 1
    with pytest.raises(p.VersionMismatchError, match=f"version {newer}") as info:
        p.check_hello(future)
    assert (info.value.local, info.value.remote) == (p.PROTOCOL_VERSION, newer)


@pytest.mark.parametrize(
    "kwargs", [{"chunk_bytes": 0}, {"chunk_timeout_s": 0}, {"max_frame_bytes": 1024}, {"max_chunks": 1.5}]
)
def test_bad_limits(kwargs: dict[str, Any]) -> None:
    with pytest.raises(p.ValidationError):
        p.Limits(**kwargs)


PING = {"tag": "pong", "fields": {"nonce": 1}}
GOOD_TENSOR_FIELDS = {"task_id": "t", "output_tensor": tensor_meta(), "plan_version": 1, "start_pos": 0, "ahead": None}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "too short"),
        (b"\x00\x00", "too short"),
        (struct.pack(">I", 10) + b"\x80", "runs past the end"),
        (struct.pack(">I", 0xFFFFFFFF), "exceeds limit"),
        (struct.pack(">I", 1) + b"\xc1", "not valid msgpack"),
        (frame([1, 2]), "expected a map"),
        (frame({"tag": "ping"}), "missing fields \\['fields'\\]"),
        (frame({**PING, "extra": 1}), "unknown fields \\['extra'\\]"),
        (frame({"tag": "pang", "fields": {}}), "unknown message tag 'pang'"),
        (frame({"tag": 7, "fields": {}}), "unknown message tag 7"),
        (frame({"tag": "pong", "fields": {}}), "pong: missing fields \\[.nonce.\\]"),
        (frame({"tag": "pong", "fields": {"nonce": 1, "x": 2}}), "unknown fields \\['x'\\]"),
        (frame({"tag": "pong", "fields": {"nonce": "1"}}), "pong.nonce: expected an int, got str"),
        (frame({"tag": "pong", "fields": {"nonce": True}}), "expected an int, got bool"),
        (frame({"tag": "pong", "fields": {"nonce": -5}}), "nonce must be in"),
        (frame({"tag": "pong", "fields": {"nonce": b"x"}}), "not valid msgpack"),
        (frame({"tag": "heartbeat", "fields": {"load": 2.0, "status": "idle", "steps": 0, "compute_s": 0.0}}), "load"),
        (frame(PING, b"junk"), "4 trailing bytes"),
        (frame(PING)[:-1], "runs past the end"),
        (frame(PING, header_len=3), "not valid msgpack"),
        (frame({"tag": "bye", "fields": {"reason": "x" * 70000}}), "not valid msgpack"),
        (frame({"tag": "compute-result", "fields": GOOD_TENSOR_FIELDS}, b"ab"), "runs past the end"),
        (
            frame(
                {
                    "tag": "compute-result",
                    "fields": {**GOOD_TENSOR_FIELDS, "output_tensor": tensor_meta(offset=1)},
                },
                b"abc",
            ),
            "offset 1 should be 0",
        ),
        (
            frame(
                {
                    "tag": "compute-result",
                    "fields": {**GOOD_TENSOR_FIELDS, "output_tensor": tensor_meta(nbytes=4)},
                },
                b"abcd",
            ),
            "needs 3 bytes, header says 4",
        ),
        (
            frame(
                {
                    "tag": "compute-result",
                    "fields": {**GOOD_TENSOR_FIELDS, "output_tensor": tensor_meta(dtype=["x"])},
                },
                b"abc",
            ),
            "unknown dtype",
        ),
        (
            frame(
                {
                    "tag": "compute-result",
                    "fields": {**GOOD_TENSOR_FIELDS, "output_tensor": tensor_meta(shape=[1] * 9)},
                }
            ),
            "9 dimensions",
        ),
        (
            frame(
                {
                    "tag": "compute-result",
                    "fields": {**GOOD_TENSOR_FIELDS, "output_tensor": tensor_meta(ref="r")},
                }
            ),
            "offset nil",
        ),
        (
            frame({"tag": "compute-result", "fields": {**GOOD_TENSOR_FIELDS, "output_tensor": [1]}}),
            "output_tensor: expected a map",
        ),
        (
            frame({"tag": "room-view", "fields": {"epoch": 1, "members": [{"info": 1}], "plan": None, "acked": [], "links": [], "heartbeat_s": 1.0, "tasks": [], "measured_ms": 0.0}}),
            "room-view.members\\[0\\]: missing fields",
        ),
        (
            frame(
                {
                    "tag": "tensor-chunk",
                    "fields": {
                        "tensor_id": "t",
                        "chunk_index": 0,
                        "total_chunks": 1,
                        "total_bytes": 2,
                        "data": {"offset": 0, "nbytes": 3},
                    },
                },
                b"abc",
            ),
            "carry 2 bytes",
        ),
    ],
)
def test_malformed_frames_raise_decode_error(body: bytes, needle: str) -> None:
    with pytest.raises(p.DecodeError, match=needle):
        p.decode(body)


def test_checksum_mismatch_is_a_typed_error() -> None:
    body = bytearray(p.encode(p.ComputeResult("t", p.TensorData("uint8", (4,), b"abcd"))))
    body[-1] ^= 0x01
    with pytest.raises(p.ChecksumError, match="corrupt") as info:
        p.decode(body)
    assert isinstance(info.value, p.DecodeError)


def test_limits_apply_to_frames_and_strings() -> None:
    small = p.Limits(max_frame_bytes=64 * 1024, max_header_bytes=8192, chunk_bytes=1024, max_string_bytes=10)
    with pytest.raises(p.DecodeError, match="frame of"):
        p.decode(p.encode(p.TensorChunk("t", 0, 1, 70000, b"x" * 70000)), small)
    with pytest.raises(p.DecodeError, match="msgpack"):
        p.decode(p.encode(p.Bye("x" * 11)), small)
    with pytest.raises(p.DecodeError, match="exceeds limit"):
        p.decode(
            p.encode(p.ComputeResult("t", p.TensorData("uint8", (20,), b"x" * 20))),
            p.Limits(max_tensor_bytes=10),
        )


@pytest.mark.parametrize("ref", [None, "chunks"])
def test_huge_tensor_claim_is_rejected_before_allocation(ref: str | None) -> None:
    meta = tensor_meta(dtype="float32", shape=[25, GiB], nbytes=100 * GiB, offset=None if ref else 0, ref=ref)
    body = frame({"tag": "compute-result", "fields": {**GOOD_TENSOR_FIELDS, "output_tensor": meta}})
    tracemalloc.start()
    try:
        with pytest.raises(p.DecodeError, match="exceeds limit"):
            p.decode(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_huge_chunked_tensor_is_rejected_before_allocation() -> None:
    reassembler = p.Reassembler()
    chunk = p.TensorChunk("t", 0, 102_400, 100 * GiB, b"x" * (1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(p.ChunkError, match="exceed the tensor limit"):
            reassembler.feed(chunk, 0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert reassembler.pending_bytes == 0
