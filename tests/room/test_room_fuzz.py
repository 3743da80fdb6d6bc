"""Whatever bytes arrive, a connection answers with events, never with a crash or a hang."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from peerpipe.protocol import PROTOCOL_VERSION, Heartbeat, Hello
from peerpipe.room import parse_code
from peerpipe.transport import Closed, Connection, MessageReceived, Role, State

CODE = parse_code("7-amber-falcon")


def _open_pair() -> tuple[Connection, Connection]:
    a = Connection(CODE, Role.DIALER, Hello(PROTOCOL_VERSION, "a", "a"))
    b = Connection(CODE, Role.LISTENER, Hello(PROTOCOL_VERSION, "b", "b"))
    to_b, to_a = a.start(), b.start()
    a.receive_data(to_a)
    b.receive_data(to_b)
    a.receive_data(b.data_to_send())
    b.receive_data(a.data_to_send())
    assert a.state is b.state is State.OPEN
    return a, b


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_random_bytes_in_handshake_only_close(chunks: list[bytes]) -> None:
    conn = Connection(CODE, Role.LISTENER, Hello(PROTOCOL_VERSION, "b", "b"))
    conn.start()
    for chunk in chunks:
        for event in conn.receive_data(chunk):
            assert isinstance(event, Closed) and event.error is not None
    assert conn.state in (State.HANDSHAKE, State.CLOSED)


@settings(max_examples=60, deadline=None)  # each example pays for a SPAKE2 handshake (~18 ms)
@given(
    st.integers(min_value=0), st.integers(min_value=1, max_value=255), st.integers(min_value=1, max_value=64)
)
def test_any_flipped_bit_in_a_record_stream_is_caught(position: int, mask: int, cut: int) -> None:
    a, b = _open_pair()
    wire = bytearray(a.send(Heartbeat(0.5, "idle")) + a.send(Heartbeat(0.25, "busy")))
    wire[position % len(wire)] ^= mask
    events = []
    for start in range(0, len(wire), cut):
        events += b.receive_data(bytes(wire[start : start + cut]))
    delivered = [e for e in events if isinstance(e, MessageReceived)]
    closed = [e for e in events if isinstance(e, Closed)]
    # A flipped bit never goes unnoticed: at most the untouched first record is delivered, and
    # the stream ends in an error, or stalls on a length that grew (the reader's deadline ends it).
    assert len(delivered) < 2
    assert delivered == [MessageReceived(Heartbeat(0.5, "idle"))][: len(delivered)]
    assert len(closed) <= 1 and all(c is events[-1] and c.error is not None for c in closed)
