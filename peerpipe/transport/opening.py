"""Opening channels: a protocol factory for sockets, the handshake on a fresh stream, and
``dial`` for the connecting side. Listening sockets belong to the room's node, which adds the
per-address rate limit; both sides share ``handshake``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from peerpipe.protocol import Hello
from peerpipe.transport.channel import Address, Channel, TransportConfig
from peerpipe.transport.connection import Closed, Connection, MessageReceived, State, Throttled
from peerpipe.transport.crypto import Role, Secret
from peerpipe.transport.errors import ConnectionClosedError, HandshakeError, TransportTimeoutError
from peerpipe.transport.stream import Stream


def stream_factory(
    secret: Secret,
    role: Role,
    hello: Hello,
    config: TransportConfig,
    on_open: Callable[[Stream], None] | None = None,
) -> Callable[[], Stream]:
    """A protocol factory for ``loop.create_connection`` / ``create_server``: one fresh connection each."""

    def make() -> Stream:
        conn = Connection(secret, role, hello, config.limits)
        return Stream(
            conn, read_bytes=config.read_bytes, write_buffer_bytes=config.write_buffer_bytes, on_open=on_open
        )

    return make


OnWait = Callable[[float], None]


async def handshake(stream: Stream, config: TransportConfig, on_wait: OnWait | None = None) -> Channel:
    """Run the PAKE, key confirmation and Hello on a fresh stream; returns an open channel.

    A listener's wait notice moves the deadline out by the wait it announces, and ``on_wait``
    hears it. Raises ``HandshakeFailed`` carrying the typed error and whether the peer spent a
    guess at the code (for the rate limiter); the caller closes the transport then.
    """
    conn, transport = stream.conn, stream.transport
    channel = Channel(stream, config)
    transport.write(conn.start())
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(config.handshake_timeout_s) as deadline:
            while True:
                events = conn.receive_buffered()
                if not events and stream.at_eof:
                    events = conn.receive_data(b"")
                if out := conn.data_to_send():
                    transport.write(out)
                    await stream.drain()
                for event in events:
                    if isinstance(event, Closed):
                        await _linger(stream)
                        raise HandshakeFailed(event.error or HandshakeError(event.reason), conn.code_tried)
                    if isinstance(event, MessageReceived):
                        channel.early.append(event.message)
                    elif isinstance(event, Throttled):
                        deadline.reschedule(loop.time() + event.seconds + config.handshake_timeout_s)
                        if on_wait is not None:
                            on_wait(event.seconds)
                if conn.state is State.OPEN:
                    return channel
                await stream.wait_readable()
    except TimeoutError:
        raise HandshakeFailed(
            TransportTimeoutError(f"the handshake did not finish within {config.handshake_timeout_s:g} s"),
            conn.code_tried,
        ) from None
    except (ConnectionError, OSError) as exc:
        raise HandshakeFailed(
            HandshakeError(f"the connection broke during the handshake ({exc})"), conn.code_tried
        ) from exc


class HandshakeFailed(Exception):
    """Internal carrier: the typed error plus whether the peer spent a guess at the code."""

    def __init__(self, error: BaseException, code_tried: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.code_tried = code_tried


async def _linger(stream: Stream) -> None:
    # After a failed handshake the peer fails too. Closing at once could reset the stream and
    # lose its last frame (its own verdict), so half-close and wait briefly for its end.
    transport = stream.transport
    with contextlib.suppress(ConnectionError, OSError, TimeoutError, RuntimeError):
        if transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()
        async with asyncio.timeout(1.0):
            while not stream.at_eof:  # what arrives meanwhile is dropped: the connection is closed
                await stream.wait_readable()


async def dial(
    address: Address,
    secret: Secret,
    hello: Hello,
    config: TransportConfig | None = None,
    on_wait: OnWait | None = None,
) -> Channel:
    """Connect to ``address`` and authenticate with ``secret``. Raises a ``TransportError`` on failure."""
    config = config or TransportConfig()
    host, port = address
    factory = stream_factory(secret, Role.DIALER, hello, config)
    try:
        async with asyncio.timeout(config.connect_timeout_s):
            _, stream = await asyncio.get_running_loop().create_connection(factory, host, port)
    except TimeoutError:
        raise TransportTimeoutError(
            f"could not reach {host}:{port} within {config.connect_timeout_s:g} s"
        ) from None
    except OSError as exc:
        raise ConnectionClosedError(f"could not connect to {host}:{port}: {exc.strerror or exc}") from exc
    try:
        return await handshake(stream, config, on_wait)
    except HandshakeFailed as failed:
        stream.transport.close()
        raise failed.error from None
    except BaseException:
        stream.transport.close()
        raise
