"""The asyncio shell around ``Connection``: one ``Channel`` per TCP stream.

A channel owns a socket, a sans-IO ``Connection`` and a ``SendScheduler``. Its
``run()`` holds a task group with a writer and a watchdog task and reads in its own
body, and returns when the connection ends. Every wait has a deadline: connect,
handshake, each read (idle timeout, kept alive by pings) and each drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

from peerpipe.protocol import (
    DEFAULT_LIMITS,
    Bye,
    ChunkError,
    Hello,
    Limits,
    Message,
    Ping,
    Pong,
    Reassembler,
    TensorChunk,
    is_background,
    split,
    tensor_fields,
)
from peerpipe.transport.connection import Closed, MessageReceived, State
from peerpipe.transport.errors import ConnectionClosedError, TransportError, TransportTimeoutError
from peerpipe.transport.scheduler import SendScheduler
from peerpipe.transport.stream import Stream

log = logging.getLogger(__name__)
_OPEN = State.OPEN  # a module global reads faster than an Enum member (per message)
T = TypeVar("T")
Address = tuple[str, int]
Deliver = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class TransportConfig:
    limits: Limits = DEFAULT_LIMITS
    connect_timeout_s: float = 5.0
    handshake_timeout_s: float = 10.0
    keepalive_s: float = 5.0  # ping when we have sent nothing for this long
    idle_timeout_s: float = 20.0  # give up on a peer we heard nothing from for this long
    write_timeout_s: float = 30.0  # a peer that reads nothing for this long is gone
    close_timeout_s: float = 5.0
    read_bytes: int = 1 << 20
    write_buffer_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name != "limits" and not value > 0:
                raise ValueError(f"TransportConfig.{name} must be positive, got {value!r}")
        if self.idle_timeout_s <= self.keepalive_s:
            raise ValueError("idle_timeout_s must exceed keepalive_s, or idle peers would be dropped")


@dataclass
class Channel:
    """An open, authenticated connection to one peer."""

    stream: Stream
    config: TransportConfig = field(default_factory=TransportConfig)
    clock: Callable[[], float] = time.monotonic  # shared with the stream, whose reads it stamps
    rtt_s: float | None = field(default=None, init=False)  # last keepalive round trip
    ended: Closed | None = field(default=None, init=False)  # how it ended, once run() returned
    _sched: SendScheduler[asyncio.Future[None]] = field(default_factory=SendScheduler, init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    early: list[Message] = field(default_factory=list, init=False)  # arrived with the handshake
    _closing: bool = field(default=False, init=False)
    _bye_reason: str = field(default="", init=False)
    _writer_done: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _write_error: TransportError | None = field(default=None, init=False)
    _pings: dict[int, float] = field(default_factory=dict, init=False)
    _nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1), init=False)
    _probes: dict[int, asyncio.Future[float]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        # One clock for both: the watchdog compares our "now" with the stream's last read.
        self.stream.clock = self.clock
        self.stream.last_rx = self.clock()
        self.conn = self.stream.conn
        self.transport = self.stream.transport
        self._limits = self.config.limits
        self._reassembler = Reassembler(self._limits)
        self._last_tx = self.clock()

    @property
    def peer(self) -> Hello:
        assert self.conn.peer_hello is not None, "peer is known once the handshake is done"
        return self.conn.peer_hello

    @property
    def address(self) -> Address:
        host, port = self.transport.get_extra_info("peername")[:2]
        return host, port

    # -- sending -------------------------------------------------------------------------

    async def send(self, message: Message, *, stream: Hashable | None = None) -> None:
        """Queue ``message`` (chunked if big) and wait until it is written to the socket.

        Waiting is the backpressure: a sender cannot run ahead of the network. Transfers
        sharing ``stream`` arrive in order; others may interleave (see scheduler.py).
        """
        if self._closing or self.conn.state is not _OPEN or self.transport.is_closing():
            self._check_open()
        if stream is None and not self._sched.frames and not self._needs_chunks(message) and not is_background(message):
            # Nothing queued ahead of it, so writing now keeps order and saves a task switch.
            self.transport.writelines(self.conn.send_parts(message))
            self._last_tx = self.clock()
            if self.stream.write_paused:
                await self._drain()
            return
        frames = split(message, self._limits)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sched.add(frames, done, stream)
        self._wake.set()
        await done

    async def probe(self, payload_bytes: int = 0, timeout_s: float | None = None) -> float:
        """Seconds from sending a ping carrying ``payload_bytes`` to its pong: a round trip, plus
        the payload's transfer time when it is large (which gives the link's bandwidth)."""
        nonce = next(self._nonces)
        pong: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._probes[nonce] = pong
        try:
            async with asyncio.timeout(timeout_s or self.config.idle_timeout_s):
                sent = self.clock()
                await self.send(Ping(nonce, bytes(payload_bytes)))
                return await pong - sent
        except TimeoutError:
            raise TransportTimeoutError(f"no answer from {self.peer.name or self.peer.node_id} to a probe") from None
        finally:
            self._probes.pop(nonce, None)

    def _needs_chunks(self, message: Message) -> bool:
        """Whether ``split`` would cut ``message`` (the same test, without building its result)."""
        for name in tensor_fields(type(message)):
            tensor = getattr(message, name)
            if tensor is not None and tensor.ref is None and len(tensor.data) > self._limits.chunk_bytes:
                return True
        return False

    def _check_open(self) -> None:
        if self._closing or self.conn.state is not State.OPEN or self.transport.is_closing():
            raise ConnectionClosedError(f"the connection to {self.peer.name or self.peer.node_id} is closed")

    async def _drain(self) -> None:
        # Only a paused transport (buffer above its high-water mark) makes drain() wait; checking
        # first skips a timeout context per frame, which is most of a small message's cost.
        if not self.stream.write_paused:
            if self.transport.is_closing():
                await self.stream.drain()  # raises once the connection is lost
            return
        try:
            async with asyncio.timeout(self.config.write_timeout_s):
                await self.stream.drain()
        except TimeoutError:
            raise TransportTimeoutError(
                f"the peer read nothing for {self.config.write_timeout_s:g} s: giving up on it"
            ) from None

    async def _guarded_write_loop(self) -> None:
        # A write failure ends the connection: record why and abort the socket, which wakes the
        # reader with EOF, so the task group never has to carry an exception group.
        try:
            await self._write_loop()
        except (TransportError, ConnectionError, OSError) as exc:
            self._write_error = exc if isinstance(exc, TransportError) else ConnectionClosedError(str(exc))
            self.transport.abort()
        finally:
            self._writer_done.set()

    async def _write_loop(self) -> None:
        while True:
            item = self._sched.pop()
            if item is None:
                if self._closing:
                    # Everything queued before close() is out; the goodbye goes last.
                    self.transport.writelines(self.conn.send_parts(Bye(self._bye_reason)))
                    await self._drain()
                    return
                self._wake.clear()
                await self._wake.wait()  # set by send(), close() and the watchdog's pings
                continue
            frame, done = item
            self.transport.writelines(self.conn.send_parts(frame))
            self._last_tx = self.clock()
            await self._drain()
            if done is not None and not done.done():
                done.set_result(None)

    async def close(self, reason: str = "") -> None:
        """Politely leave: flush what is queued, send ``Bye``, close. Never raises."""
        if self._closing or self.conn.state is not State.OPEN:
            return
        self._closing = True
        self._bye_reason = reason
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.close_timeout_s):
                await self._writer_done.wait()

    async def refuse(self, reason: str) -> None:
        """Say ``Bye(reason)`` on a channel that never started running, and close it."""
        with contextlib.suppress(TransportError, ConnectionError, OSError):
            self.transport.writelines(self.conn.send_parts(Bye(reason)))
            await self._drain()
        self.conn.close()
        await self._shutdown()

    # -- receiving -----------------------------------------------------------------------

    async def run(self, deliver: Deliver) -> Closed:
        """Pump messages to ``deliver`` until the connection ends; returns how it ended."""
        # Messages that came in the same reads as the peer's Hello take the normal path too:
        # pings are answered, chunks reassembled.
        early, self.early = self.early, []
        for message in early:
            if (full := self._on_message(message)) is not None:
                await deliver(full)
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._guarded_write_loop())
                watchdog = tg.create_task(self._watchdog())
                try:
                    ended = await self._read_loop(deliver)
                finally:
                    watchdog.cancel()
                    if not writer.done():
                        writer.cancel()
            if self._write_error is not None:
                ended = Closed(str(self._write_error), self._write_error)
        finally:
            for done in self._sched.clear():
                if not done.done():
                    done.set_exception(ConnectionClosedError("the connection closed before this was sent"))
            if self.conn.state is not State.CLOSED:
                self.conn.close()
            await self._shutdown()
        self.ended = ended
        return ended

    async def _read_loop(self, deliver: Deliver) -> Closed:
        conn, stream, on_message = self.conn, self.stream, self._on_message
        while True:
            events = conn.receive_buffered()
            if events:
                for event in events:
                    if type(event) is MessageReceived:
                        if (full := on_message(event.message)) is not None:
                            await deliver(full)
                    elif isinstance(event, Closed):
                        return event
                if conn.buffered_bytes:
                    continue  # more arrived while we delivered
            elif stream.at_eof:
                lost = conn.receive_data(b"")
                return lost[0] if lost else (conn.closed_event or Closed("the connection was lost"))
            # The idle deadline on this wait is enforced by _watchdog (no per-read timer).
            await stream.wait_readable()

    async def _watchdog(self) -> None:
        """Keepalive and idle deadline: ping a quiet link, drop a peer we stopped hearing from,
        free tensors whose chunks stopped coming."""
        period = min(self.config.keepalive_s, self.config.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = self.clock()
            if now - self.stream.last_rx > self.config.idle_timeout_s:
                self._write_error = TransportTimeoutError(
                    f"heard nothing from the peer for {self.config.idle_timeout_s:g} s: dropped it"
                )
                self.transport.abort()  # wakes the reader with EOF
                return
            if self._reassembler.pending_tensors:
                for error in self._reassembler.expire(now):
                    log.warning("dropped a stalled tensor: %s", error)
            if now - self._last_tx >= self.config.keepalive_s and not self._closing:
                nonce = next(self._nonces)
                self._pings[nonce] = now
                self._sched.add([Ping(nonce)])
                self._wake.set()

    def _on_message(self, message: Message) -> Message | None:
        """Handle pings and chunks here; returns what the application should see, if anything."""
        kind = type(message)
        if kind is Ping:
            assert isinstance(message, Ping)
            if not self._closing:
                self._sched.add([Pong(message.nonce)])
                self._wake.set()
            return None
        if kind is Pong:
            assert isinstance(message, Pong)
            sent = self._pings.pop(message.nonce, None)
            if sent is not None:
                self.rtt_s = self.clock() - sent
            elif (probe := self._probes.pop(message.nonce, None)) is not None and not probe.done():
                probe.set_result(self.clock())
            return None
        try:
            # Only a chunk needs the time (for its tensor's stall deadline).
            return self._reassembler.feed(message, self.clock() if kind is TensorChunk else 0.0)
        except ChunkError as exc:
            # An authenticated peer sent inconsistent chunks: a bug on its side; the tensor is
            # already freed, the rest of the connection is fine.
            log.warning("peer %s: %s", self.peer.node_id, exc)
            return None

    async def _shutdown(self) -> None:
        if self.transport.is_closing():
            return
        self.transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.close_timeout_s):
                await self.stream.wait_closed()
