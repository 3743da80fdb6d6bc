"""The sans-IO connection: handshake, wrong codes, record tampering, the state table."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest

from peerpipe.protocol import (
    PROTOCOL_VERSION,
    Bye,
    ComputeRequest,
    DecodeError,
    Heartbeat,
    Hello,
    Limits,
    Ping,
    TensorData,
    VersionMismatchError,
    encode,
)
from peerpipe.room import parse_code
from peerpipe.transport import (
    Closed,
    Connection,
    FrameTooLargeError,
    HandshakeError,
    IllegalTransitionError,
    MessageReceived,
    Opened,
    PeerProtocolError,
    RecordAuthError,
    Role,
    State,
    WrongCodeError,
)
from peerpipe.transport.connection import TRANSITIONS, Event, Input
from peerpipe.transport.crypto import RecordSealer

CODE = parse_code("7-amber-falcon")


def hello(name: str, version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(version, f"id-{name}", name)


def pair(
    code_a: str = "7-amber-falcon", code_b: str = "7-amber-falcon", version_b: int = PROTOCOL_VERSION
) -> tuple[Connection, Connection, list[Event], list[Event]]:
    """Run a handshake between a dialer and a listener; returns both and the events each saw."""
    a = Connection(parse_code(code_a), Role.DIALER, hello("alice"))
    b = Connection(parse_code(code_b), Role.LISTENER, hello("bob", version_b))
    to_b, to_a = a.start(), b.start()
    ev_a = a.receive_data(to_a)
    ev_b = b.receive_data(to_b)
    ev_a += a.receive_data(b.data_to_send())
    ev_b += b.receive_data(a.data_to_send())
    return a, b, ev_a, ev_b


def split_frames(data: bytes) -> list[bytes]:
    frames, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        frames.append(data[pos : pos + 4 + n])
        pos += 4 + n
    return frames


def test_handshake_opens_both_sides_and_messages_flow() -> None:
    a, b, ev_a, ev_b = pair()
    assert ev_a == [Opened(hello("bob"))] and ev_b == [Opened(hello("alice"))]
    assert a.state is b.state is State.OPEN
    assert b.receive_data(a.send(Heartbeat(0.5, "idle"))) == [MessageReceived(Heartbeat(0.5, "idle"))]
    assert a.receive_data(b.send(Ping(9))) == [MessageReceived(Ping(9))]


def test_byte_at_a_time_delivery_works() -> None:
    a, b, _, _ = pair()
    data = a.send(Ping(1)) + a.send(Ping(2))
    events = [e for i in range(len(data)) for e in b.receive_data(data[i : i + 1])]
    assert events == [MessageReceived(Ping(1)), MessageReceived(Ping(2))]


def test_big_tensor_round_trips() -> None:
    a, b, _, _ = pair()
    arr = np.arange(300_000, dtype=np.float32).reshape(1, -1)
    [event] = b.receive_data(a.send(ComputeRequest("t", TensorData.from_numpy(arr))))
    assert isinstance(event, MessageReceived)
    np.testing.assert_array_equal(event.message.input_tensor.to_numpy(), arr)  # type: ignore[union-attr]


def test_reads_into_the_receive_buffer_in_odd_pieces() -> None:
    # The socket path: the loop reads into get_buffer() views, in pieces that cut frames anywhere.
    a, b, _, _ = pair()
    big = np.arange(5_000_000, dtype=np.float32).reshape(1, -1)  # one 20 MB record: the buffer has to grow
    wire = a.send(Ping(1)) + a.send(ComputeRequest("t", TensorData.from_numpy(big))) + a.send(Ping(2))
    events: list[Event] = []
    pos = 0
    for size in itertools.cycle([1, 7, 4096, 100_003, 1 << 20]):
        if pos == len(wire):
            break
        view = b.get_buffer(-1)
        n = min(size, len(view), len(wire) - pos)
        view[:n] = wire[pos : pos + n]
        b.buffer_updated(n)
        pos += n
        events += b.receive_buffered()
    assert [type(e.message).__name__ for e in events if isinstance(e, MessageReceived)] == [
        "Ping",
        "ComputeRequest",
        "Ping",
    ]
    np.testing.assert_array_equal(events[1].message.input_tensor.to_numpy(), big)  # type: ignore[union-attr]
    assert b.buffered_bytes == 0
    assert len(b.get_buffer(-1)) < 1 << 20  # the emptied big buffer was given back


def test_wrong_code_fails_on_both_sides_with_wrong_code_error() -> None:
    a, b, ev_a, ev_b = pair(code_b="7-amber-fox")
    for conn, events in ((a, ev_a), (b, ev_b)):
        [event] = events
        assert isinstance(event, Closed) and isinstance(event.error, WrongCodeError)
        assert "room code is wrong" in event.reason
        assert conn.state is State.CLOSED and conn.code_tried


def test_wrong_nameplate_is_a_wrong_code_too() -> None:
    _, _, ev_a, ev_b = pair(code_b="8-amber-falcon")
    assert all(isinstance(e, Closed) and isinstance(e.error, WrongCodeError) for e in ev_a + ev_b)


def test_version_mismatch_is_typed() -> None:
    _, _, ev_a, ev_b = pair(version_b=PROTOCOL_VERSION + 1)
    [event] = ev_a
    assert isinstance(event, Closed) and isinstance(event.error, VersionMismatchError)
    assert ev_b == [Opened(hello("alice"))]  # b accepts a's hello; a hangs up on b's


def test_wrong_code_reveals_no_plaintext_hello() -> None:
    a = Connection(CODE, Role.DIALER, hello("alice-secret-name"))
    b = Connection(parse_code("7-amber-fox"), Role.LISTENER, hello("bob"))
    wire, to_a = a.start(), b.start()
    b.receive_data(wire)
    a.receive_data(to_a)
    wire += a.data_to_send()
    assert b"alice-secret-name" not in wire and b"amber" not in wire and b"falcon" not in wire


@pytest.mark.parametrize("where", [4, 10, -1])
def test_tampered_record_fails_authentication(where: int) -> None:
    a, b, _, _ = pair()
    frame = bytearray(a.send(Ping(1)))
    frame[where] ^= 0x01
    [event] = b.receive_data(bytes(frame))
    assert isinstance(event, Closed) and isinstance(event.error, RecordAuthError)
    assert b.state is State.CLOSED
    assert b.receive_data(a.send(Ping(2))) == []  # closed for good


def test_replayed_record_fails_authentication() -> None:
    a, b, _, _ = pair()
    frame = a.send(Ping(1))
    assert b.receive_data(frame) == [MessageReceived(Ping(1))]
    [event] = b.receive_data(frame)
    assert isinstance(event, Closed) and isinstance(event.error, RecordAuthError)


def test_reordered_records_fail_authentication() -> None:
    a, b, _, _ = pair()
    first, second = a.send(Ping(1)), a.send(Ping(2))
    [event] = b.receive_data(second + first)
    assert isinstance(event, Closed) and isinstance(event.error, RecordAuthError)


def test_reflected_record_fails_authentication() -> None:
    a, _, _, _ = pair()
    [event] = a.receive_data(a.send(Ping(1)))  # our own record echoed back
    assert isinstance(event, Closed) and isinstance(event.error, RecordAuthError)


def test_oversized_length_is_rejected_before_the_body_arrives() -> None:
    _, b, _, _ = pair()
    limits = Limits()
    [event] = b.receive_data(struct.pack(">I", limits.max_frame_bytes + 17))
    assert isinstance(event, Closed) and isinstance(event.error, FrameTooLargeError)
    fresh = Connection(CODE, Role.LISTENER, hello("bob"))
    fresh.start()
    [event] = fresh.receive_data(struct.pack(">I", 65))  # handshake frames are tiny
    assert isinstance(event.error, FrameTooLargeError)  # type: ignore[union-attr]


def test_not_a_peerpipe_peer() -> None:
    conn = Connection(CODE, Role.LISTENER, hello("bob"))
    conn.start()
    [event] = conn.receive_data(b"\x00\x00\x00\x05GET /")
    assert isinstance(event, Closed) and isinstance(event.error, HandshakeError)
    assert not conn.code_tried


def test_garbage_inside_a_valid_record_is_a_decode_error() -> None:
    a, b, _, _ = pair()
    sealer: RecordSealer = a._sealer  # type: ignore[assignment]
    ct = sealer.seal(b"\x00\x00\x00\x02{}")
    [event] = b.receive_data(struct.pack(">I", len(ct)) + ct)
    assert isinstance(event, Closed) and isinstance(event.error, DecodeError)


def test_message_before_hello_and_second_hello_are_protocol_errors() -> None:
    a = Connection(CODE, Role.DIALER, hello("alice"))
    b = Connection(CODE, Role.LISTENER, hello("bob"))
    to_a, to_b = b.start(), a.start()
    a.receive_data(to_a)
    b.receive_data(to_b)
    confirm, _hello_record = split_frames(a.data_to_send())
    a._sealer.counter = 0  # type: ignore[union-attr]  # put a Ping where the Hello belongs
    ct = a._sealer.seal(encode(Ping(1)))  # type: ignore[union-attr]
    [event] = b.receive_data(confirm + struct.pack(">I", len(ct)) + ct)
    assert isinstance(event, Closed) and isinstance(event.error, PeerProtocolError)

    a, b, _, _ = pair()
    ct = a._sealer.seal(encode(hello("alice")))  # type: ignore[union-attr]
    [event] = b.receive_data(struct.pack(">I", len(ct)) + ct)
    assert isinstance(event.error, PeerProtocolError)  # type: ignore[union-attr]


def test_bye_closes_politely_both_ways() -> None:
    a, b, _, _ = pair()
    [event] = b.receive_data(a.send(Bye("done")))
    assert event == Closed("done") and a.state is State.CLOSING and b.state is State.CLOSING
    assert b.receive_data(a.send(Ping(1)) if False else b"") == []  # after bye nothing counts
    with pytest.raises(IllegalTransitionError):
        a.send(Ping(1))


def test_eof_mid_handshake_and_when_open() -> None:
    a = Connection(CODE, Role.DIALER, hello("alice"))
    a.start()
    [event] = a.receive_data(b"")
    assert isinstance(event.error, HandshakeError)  # type: ignore[union-attr]
    a, _, _, _ = pair()
    [event] = a.receive_data(b"")
    assert isinstance(event, Closed) and event.error is not None and a.state is State.CLOSED


def test_illegal_calls_raise() -> None:
    conn = Connection(CODE, Role.DIALER, hello("alice"))
    with pytest.raises(IllegalTransitionError):
        conn.send(Ping(1))  # not open yet
    with pytest.raises(IllegalTransitionError):
        conn.receive_data(b"\x00\x00\x00\x01\x01")  # before start()
    conn.start()
    with pytest.raises(IllegalTransitionError):
        conn.start()


ALL_STATES = list(State)


@pytest.mark.parametrize("state", ALL_STATES)
@pytest.mark.parametrize("what", list(Input))
def test_transition_table_is_total_and_strict(state: State, what: Input) -> None:
    conn = Connection(CODE, Role.DIALER, hello("alice"))
    conn.state = state
    expected = TRANSITIONS.get((state, what))
    if expected is None:
        with pytest.raises(IllegalTransitionError):
            conn._apply(what)
    else:
        conn._apply(what)
        assert conn.state is expected


def test_closed_is_terminal_and_reachable_from_every_state() -> None:
    assert all(to is State.CLOSED for (s, _), to in TRANSITIONS.items() if s is State.CLOSED)
    for state in ALL_STATES:
        assert TRANSITIONS[(state, Input.CLOSE)] is State.CLOSED
