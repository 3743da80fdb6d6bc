"""The sans-IO connection: bytes in, events out; ``send(msg)`` gives the bytes to write.

One ``Connection`` is one end of one TCP stream between two nodes. It runs the
handshake (SPAKE2 from the room code, key confirmation, ``Hello``), then protects
every message with AES-GCM. It never touches a socket or a clock, so every state
and every failure is testable by feeding bytes (see docs/transport.md).

Wire, both directions, every frame: ``u32 length (big endian) | body``.
Handshake bodies are plaintext ``type | payload`` (a listener that delays a handshake first
sends a wait notice, ``3 | u32 ms``); every frame after the peer's
confirmation is an encrypted record whose plaintext is one encoded ``Message``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from peerpipe.errors import PeerpipeError
from peerpipe.protocol import (
    DEFAULT_LIMITS,
    Bye,
    Hello,
    Limits,
    Message,
    ProtocolError,
    check_hello,
    decode,
    encode,
)
from peerpipe.transport.crypto import (
    APP_ID,
    CONFIRM_BYTES,
    TAG_BYTES,
    Pake,
    RecordOpener,
    RecordSealer,
    Role,
    Secret,
    SessionKeys,
)
from peerpipe.transport.errors import (
    ConnectionClosedError,
    FrameTooLargeError,
    HandshakeError,
    IllegalTransitionError,
    PeerProtocolError,
    TransportError,
)

_LEN = struct.Struct(">I")
HEADER_BYTES = _LEN.size
MAX_HANDSHAKE_FRAME = 64
MIN_READ = 256 * 1024  # the least free space get_buffer() offers a read
# An emptied receive buffer above this is given back (steady bulk traffic stays below: 8 MiB).
MAX_IDLE_BUFFER = 16 * 1024 * 1024
_PAKE = 1
_CONFIRM = 2
_WAIT = 3  # listener -> dialer, before its PAKE message: "I answer in this many ms" (u32)
MAX_WAIT_MS = 120_000  # a listener may ask a dialer to wait at most this long per notice


class State(Enum):
    HANDSHAKE = "handshake"  # keys not yet confirmed by the peer
    AUTHENTICATED = "authenticated"  # peer proved it holds the code; waiting for its Hello
    OPEN = "open"  # Hello exchanged and versions match: messages flow both ways
    CLOSING = "closing"  # a Bye was sent or received; the stream is winding down
    CLOSED = "closed"


class Input(Enum):
    PEER_CONFIRMED = "peer confirmed the key"
    PEER_HELLO = "peer sent Hello"
    SEND_BYE = "we send Bye"
    RECV_BYE = "peer sent Bye"
    CONNECTION_LOST = "connection lost"
    FAIL = "error"
    CLOSE = "local close"


_LIVE = (State.HANDSHAKE, State.AUTHENTICATED, State.OPEN, State.CLOSING)
TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.HANDSHAKE, Input.PEER_CONFIRMED): State.AUTHENTICATED,
    (State.AUTHENTICATED, Input.PEER_HELLO): State.OPEN,
    (State.OPEN, Input.SEND_BYE): State.CLOSING,
    (State.OPEN, Input.RECV_BYE): State.CLOSING,
    (State.CLOSING, Input.SEND_BYE): State.CLOSED,
    (State.CLOSING, Input.RECV_BYE): State.CLOSED,
    **{(s, Input.CONNECTION_LOST): State.CLOSED for s in _LIVE},
    **{(s, Input.FAIL): State.CLOSED for s in _LIVE},
    **{(s, Input.CLOSE): State.CLOSED for s in (*_LIVE, State.CLOSED)},
}


@dataclass(frozen=True)
class Opened:
    """The handshake is complete: the peer knows the code and speaks our protocol version."""

    hello: Hello


@dataclass(frozen=True)
class MessageReceived:
    message: Message


@dataclass(frozen=True)
class Closed:
    """The connection is over. ``error`` is None for a polite ``Bye`` (``reason`` quotes it)."""

    reason: str
    error: PeerpipeError | None = None


@dataclass(frozen=True)
class Throttled:
    """The listener slows down handshakes from this address (after wrong codes): it answers in
    ``seconds``. Plaintext and unauthenticated: it can only make a dialer wait, never admit it."""

    seconds: float


Event = Opened | MessageReceived | Closed | Throttled
_OPEN = State.OPEN  # a module global reads faster than an Enum member on the per-message paths


class Connection:
    """One end of an authenticated, encrypted peerpipe stream (no I/O)."""

    def __init__(self, secret: Secret, role: Role, hello: Hello, limits: Limits = DEFAULT_LIMITS) -> None:
        self.role = role
        self.limits = limits
        self.state = State.HANDSHAKE
        self.peer_hello: Hello | None = None
        self.closed_event: Closed | None = None
        self._hello = hello
        self._pake = Pake(secret.password, role)
        self._keys: SessionKeys | None = None
        self._sealer: RecordSealer | None = None
        self._opener: RecordOpener | None = None
        self._rbuf = bytearray()
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0  # the unhandled bytes are _rbuf[_rstart:_rend]
        self._frame_limit = MAX_HANDSHAKE_FRAME
        self._outbuf: list[bytes] = []
        self._started = False

    @property
    def code_tried(self) -> bool:
        """True once the peer's SPAKE2 message was processed: the peer has spent one guess at the code."""
        return self._keys is not None

    # -- state machine -------------------------------------------------------------------

    def _apply(self, what: Input) -> None:
        try:
            self.state = TRANSITIONS[(self.state, what)]
        except KeyError:
            raise IllegalTransitionError(
                f"{what.value!r} is not allowed in state {self.state.value}"
            ) from None

    # -- outgoing ------------------------------------------------------------------------

    def start(self) -> bytes:
        """Our first bytes (the SPAKE2 message); both ends send theirs at once, no one waits."""
        if self._started:
            raise IllegalTransitionError("start() was already called")
        self._started = True
        return _frame(bytes([_PAKE]) + APP_ID + self._pake.start())

    def data_to_send(self) -> bytes:
        """Bytes the handshake produced while receiving (confirmation and Hello); empty if none."""
        out = b"".join(self._outbuf)
        self._outbuf.clear()
        return out

    def send_parts(self, message: Message) -> list[bytes]:
        """Encrypt one message; the parts written in order form one frame (saves a copy of big records)."""
        if self.state is not _OPEN:
            raise IllegalTransitionError(f"cannot send {type(message).__name__} in state {self.state.value}")
        if type(message) is Bye:
            self._apply(Input.SEND_BYE)
        assert self._sealer is not None
        ciphertext = self._sealer.seal(encode(message))
        return [_LEN.pack(len(ciphertext)), ciphertext]

    def send(self, message: Message) -> bytes:
        return b"".join(self.send_parts(message))

    def _seal(self, plaintext: bytes) -> list[bytes]:
        assert self._sealer is not None
        ciphertext = self._sealer.seal(plaintext)
        return [_LEN.pack(len(ciphertext)), ciphertext]

    def close(self) -> None:
        """We are done with this connection (for instance after writing Bye and closing the socket)."""
        self._apply(Input.CLOSE)

    # -- incoming ------------------------------------------------------------------------
    # Bytes land in one receive buffer, written either by ``receive_data`` or straight from the
    # socket through ``get_buffer``/``buffer_updated`` (the ``asyncio.BufferedProtocol`` calls),
    # then ``receive_buffered`` handles every complete frame in place: a record is decrypted from
    # a view of the buffer, never copied first.

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet handled (at most one incomplete frame after ``receive_buffered``)."""
        return self._rend - self._rstart

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Free space at the end of the receive buffer for the next read: at least ``sizehint`` bytes."""
        buf, start, end = self._rbuf, self._rstart, self._rend
        if start == end or self.closed_event is not None:
            start = end = 0  # all handled (or nothing matters any more): reuse from the front
            if len(buf) > MAX_IDLE_BUFFER:
                # One huge frame must not pin its buffer for the life of the connection.
                buf = self._rbuf = bytearray()
                self._rview = memoryview(buf)
        want = max(sizehint, MIN_READ)
        if len(buf) - end < want:
            pending = end - start
            if len(buf) - pending < want:
                # A new, bigger buffer rather than a resize: a reader may still hold a view of the
                # old one. It grows with bytes actually received, never with an announced length.
                grown = bytearray(max(2 * len(buf), pending + want))
                grown[:pending] = self._rview[start:end]
                self._rbuf, self._rview = grown, memoryview(grown)
            elif pending:
                buf[:pending] = buf[start:end]  # same size: allowed even while views exist
            start, end = 0, pending
        self._rstart, self._rend = start, end
        return self._rview[end:] if end else self._rview

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer()`` view."""
        self._rend += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the socket (``b""`` means the peer closed its side); returns what happened."""
        if not self._started:
            raise IllegalTransitionError("receive_data() before start()")
        if self.closed_event is not None:
            # After a Bye or an error nothing the peer sends can matter any more.
            return []
        if not data:
            return self._finish(
                Input.CONNECTION_LOST, Closed("the connection was lost", _lost_error(self.state))
            )
        n = len(data)
        self.get_buffer(n)[:n] = data
        self._rend += n
        return self.receive_buffered()

    def _too_large(self, start: int, length: int, limit: int) -> str:
        head = bytes(self._rbuf[start : min(start + 16, self._rend)])
        if self._opener is None and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
            # (an HTTP or SSH server, say, where a room's host was expected)
            return f"the peer is not a peerpipe node: it began with {head.decode('ascii')!r}"
        return f"the peer announced a {length}-byte frame, above the {limit}-byte limit"

    def receive_buffered(self) -> list[Event]:
        """Handle every complete frame in the receive buffer; returns what happened."""
        if not self._started:
            raise IllegalTransitionError("receive_buffered() before start()")
        events: list[Event] = []
        start = self._rstart
        if self._rend - start < HEADER_BYTES:
            return events  # not even a length yet (also the case once closed)
        buf, view = self._rbuf, self._rview  # never released early: buffers are replaced, not resized
        opener, limit = self._opener, self._frame_limit
        try:
            while self.closed_event is None and self._rend - start >= HEADER_BYTES:
                (length,) = _LEN.unpack_from(buf, start)
                if length > limit:
                    # Rejected from the header alone: a hostile length never makes us buffer its body.
                    raise FrameTooLargeError(self._too_large(start, length, limit))
                end = start + HEADER_BYTES + length
                if end > self._rend:
                    break
                body = view[start + HEADER_BYTES : end]
                self._rstart = start = end
                if opener is not None and self.state is _OPEN:
                    # The data path, inlined: decrypt, decode, and only Bye/Hello need more thought.
                    message = decode(opener.open(body), self.limits)
                    kind = type(message)
                    event = MessageReceived(message) if kind is not Bye and kind is not Hello else None
                    if event is None:
                        event = self._on_record(message)
                else:
                    event = self._handle(body)
                    opener, limit = self._opener, self._frame_limit  # the handshake may have moved on
                if event is not None:
                    events.append(event)
        except IllegalTransitionError:
            raise  # our caller's bug, not the peer's fault
        except (TransportError, ProtocolError) as exc:
            events.extend(self._finish(Input.FAIL, Closed(str(exc), exc)))
        return events

    def _finish(self, what: Input, event: Closed) -> list[Event]:
        self._apply(what)
        if self.closed_event is None:
            self.closed_event = event
            self._rstart = self._rend = 0
            return [event]
        return []

    def _handle(self, body: memoryview) -> Event | None:
        if self._opener is None:
            return self._handle_handshake(body)
        return self._on_record(decode(self._opener.open(body), self.limits))

    def _on_record(self, message: Message) -> Event | None:
        if self.state is State.AUTHENTICATED:
            return self._handle_hello(message)
        if isinstance(message, Bye):
            # A polite goodbye ends the conversation whichever side spoke first.
            self._apply(Input.RECV_BYE)
            self.closed_event = Closed(message.reason or "the peer said goodbye")
            return self.closed_event
        if isinstance(message, Hello):
            raise PeerProtocolError("the peer sent a second Hello on an open connection")
        return MessageReceived(message)

    def _handle_handshake(self, body: memoryview) -> Event | None:
        kind, payload = body[0] if body else -1, bytes(body[1:])
        if self._keys is None and kind == _WAIT and self.role is Role.DIALER:
            if len(payload) != _WAIT_MS.size:
                raise HandshakeError("the peer sent a malformed wait notice")
            (ms,) = _WAIT_MS.unpack(payload)
            if ms > MAX_WAIT_MS:
                raise HandshakeError(f"the peer asked us to wait {ms / 1e3:g} s, more than {MAX_WAIT_MS / 1e3:g} s")
            return Throttled(ms / 1e3)
        if self._keys is None:
            if kind != _PAKE or not payload.startswith(APP_ID):
                raise HandshakeError("the peer is not a peerpipe node (or speaks another wire version)")
            self._keys = self._pake.finish(payload[len(APP_ID) :])
            self._sealer = RecordSealer(self._keys.send_key)
            # Confirmation and Hello leave together: a wrong code costs the peer no extra round trip,
            # and the Hello is unreadable to anyone who does not hold the code.
            self._outbuf.append(_frame(bytes([_CONFIRM]) + self._keys.confirmation()))
            self._outbuf.extend(self._seal(encode(self._hello)))
            return None
        if kind != _CONFIRM or len(payload) != CONFIRM_BYTES:
            raise HandshakeError("the peer sent a malformed key confirmation")
        self._keys.check_confirmation(payload)
        self._opener = RecordOpener(self._keys.recv_key)
        self._frame_limit = self.limits.max_frame_bytes + TAG_BYTES
        self._apply(Input.PEER_CONFIRMED)
        return None

    def _handle_hello(self, message: Message) -> Event:
        if not isinstance(message, Hello):
            raise PeerProtocolError(f"the peer sent {type(message).__name__} before Hello")
        check_hello(message)
        self.peer_hello = message
        self._apply(Input.PEER_HELLO)
        return Opened(message)


def _frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


_WAIT_MS = struct.Struct(">I")


def wait_notice(seconds: float) -> bytes:
    """The frame a listener writes before it delays a handshake, so the dialer knows to wait
    (and for how long) instead of giving up at its own deadline."""
    ms = min(MAX_WAIT_MS, max(0, round(seconds * 1e3)))
    return _frame(bytes([_WAIT]) + _WAIT_MS.pack(ms))


def _lost_error(state: State) -> PeerpipeError | None:
    if state is State.CLOSING:
        return None
    if state is State.OPEN:
        return ConnectionClosedError("the connection to the peer was lost")
    return HandshakeError("the peer closed the connection during the handshake")
