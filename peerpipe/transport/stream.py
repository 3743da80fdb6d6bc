"""The socket end of a channel: an ``asyncio.BufferedProtocol`` around one ``Connection``.

The event loop reads straight into the connection's receive buffer (``get_buffer`` /
``buffer_updated``): no ``StreamReader``, no intermediate ``bytes``, so a received byte is
copied once by the kernel and once more by decryption. The protocol only records arrivals and
wakes the one task reading the channel; frames are handled in that task. It also carries the
write-side flow control (``drain``) that ``StreamWriter`` used to.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

from peerpipe.transport.connection import Connection

# Wraps each new socket transport (link emulation in tests and benchmarks); None in normal use.
WrapTransport = Callable[[asyncio.BaseTransport, asyncio.AbstractEventLoop], asyncio.BaseTransport]
_wrap: WrapTransport | None = None


def wrap_transports(wrap: WrapTransport | None) -> None:
    """Have every stream opened from now on write through ``wrap(transport)``; None undoes it."""
    global _wrap
    _wrap = wrap


class Stream(asyncio.BufferedProtocol):
    """One TCP connection feeding ``conn``. ``on_open`` is called once the socket is connected."""

    transport: asyncio.Transport

    def __init__(
        self,
        conn: Connection,
        *,
        read_bytes: int,
        write_buffer_bytes: int,
        on_open: Callable[[Stream], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn = conn
        self.clock = clock
        self.last_rx = clock()  # when bytes last arrived
        self.at_eof = False  # the peer closed its side, or the connection is lost
        self.write_paused = False  # the transport's buffer is above its high-water mark
        self._read_high = 2 * read_bytes  # unhandled bytes above this pause reading (backpressure)
        self._write_high = write_buffer_bytes
        self._on_open = on_open
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drainers: list[asyncio.Future[None]] = []
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        # The loop asks for a buffer before every read: hand it the connection's method itself,
        # one Python call less per read.
        self.get_buffer = conn.get_buffer  # type: ignore[method-assign]
        self._conn_buffer_updated = conn.buffer_updated

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        if _wrap is not None:
            self.transport = _wrap(transport, self._loop)  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=self._write_high)
        if self._on_open is not None:
            self._on_open(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._conn_buffer_updated(nbytes)
        self.last_rx = self.clock()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        elif not self._read_paused and self.conn.buffered_bytes > self._read_high:
            # The reader is busy (delivering a message): stop reading until it catches up.
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._ended()
        return True  # keep the transport open for writing; the channel closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()
        self.write_paused = False
        for fut in self._drainers:
            if not fut.done():
                fut.set_exception(ConnectionResetError("the connection was lost"))
        self._drainers.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()

    def _ended(self) -> None:
        self.at_eof = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- for the channel -----------------------------------------------------------------

    def wait_readable(self) -> asyncio.Future[None]:
        """Await it: done when more bytes arrive or the stream ends (call after handling what is
        buffered). A bare future rather than a coroutine: one frame less per message."""
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        waiter = self._loop.create_future()
        if self.at_eof:
            waiter.set_result(None)
        else:
            self._waiter = waiter  # a cancelled waiter left here is skipped by buffer_updated
        return waiter

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark again."""
        if self.transport.is_closing() and self._closed.done():
            raise ConnectionResetError("the connection was lost")
        if not self.write_paused:
            return
        fut = asyncio.get_running_loop().create_future()
        self._drainers.append(fut)
        await fut

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)
