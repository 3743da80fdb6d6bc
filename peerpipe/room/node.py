"""A room node: listens and dials with the same code, keeps one channel per peer.

Hosts and members are both ``RoomNode``s; members listen too, so pipeline stages send hidden
states to each other directly. The node's task group owns
every connection task; ``events()`` yields joins, leaves, refusals and messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from peerpipe.errors import PeerpipeError
from peerpipe.protocol import PROTOCOL_VERSION, Hello, Message
from peerpipe.room.codes import RoomCode
from peerpipe.room.errors import ListenAddressError, UnknownPeerError
from peerpipe.room.ratelimit import FailureLimiter
from peerpipe.transport import (
    Address,
    Channel,
    ConnectionClosedError,
    HandshakeFailed,
    Role,
    TransportConfig,
    dial,
    handshake,
    stream_factory,
)
from peerpipe.transport.connection import wait_notice
from peerpipe.transport.stream import Stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerInfo:
    node_id: str
    name: str
    address: Address


@dataclass(frozen=True)
class PeerJoined:
    peer: PeerInfo


@dataclass(frozen=True)
class PeerLeft:
    """``error`` is None when the peer said goodbye, else why we lost it."""

    peer: PeerInfo
    reason: str
    error: PeerpipeError | None


@dataclass(frozen=True)
class MessageFrom:
    peer: PeerInfo
    message: Message


@dataclass(frozen=True)
class HandshakeRefused:
    """Someone connected but failed the handshake (wrong code, wrong version, timeout...)."""

    address: Address
    error: BaseException
    failures: int = 0  # wrong codes from this address lately, this one included
    room_failures: int = 0  # wrong codes from every address lately


RoomEvent = PeerJoined | PeerLeft | MessageFrom | HandshakeRefused
# How a part hands a message to a node by id (the node itself, or a peer through the room).
Send = Callable[[str, Message], Awaitable[None]]
# Called from the peer's reader in place of a MessageFrom event: no task switch on the data
# path, and while it runs that peer's messages wait (backpressure), others do not.
OnMessage = Callable[[PeerInfo, Message], Awaitable[None]]


_Node = TypeVar("_Node", bound="RoomNode")


class RoomNode:
    """Use as ``async with RoomNode(code) as node:``; leaving the block says goodbye to every peer.

    Messages arrive as ``MessageFrom`` events, or through ``on_message`` when given.
    """

    def __init__(
        self,
        code: RoomCode,
        *,
        name: str = "",
        node_id: str | None = None,
        config: TransportConfig | None = None,
        limiter: FailureLimiter | None = None,
        max_handshakes: int = 32,
        event_queue_size: int = 1024,
        on_message: OnMessage | None = None,
    ) -> None:
        self.code = code
        self.node_id = node_id or uuid.uuid4().hex
        self.name = name or socket.gethostname()
        self.config = config or TransportConfig()
        self.limiter = limiter or FailureLimiter()
        self.hello = Hello(PROTOCOL_VERSION, self.node_id, self.name, software="peerpipe")
        self._channels: dict[str, Channel] = {}
        self._peers: dict[str, PeerInfo] = {}
        self._events: asyncio.Queue[RoomEvent] = asyncio.Queue(event_queue_size)
        self._on_message = on_message
        self._handshakes = asyncio.Semaphore(max_handshakes)
        # Connections not yet authenticated, waiting or handshaking: each holds a socket and a
        # receive buffer, so their number is capped.
        self._unauthenticated = 0
        self._max_unauthenticated = 4 * max_handshakes
        self._gates = _Gates()
        self._tasks: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._stack = contextlib.AsyncExitStack()
        self._leaving = False
        self._peer_waiters: dict[str, list[asyncio.Future[None]]] = {}

    # -- lifetime ------------------------------------------------------------------------

    async def __aenter__(self: _Node) -> _Node:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        try:
            await self.leave()
        finally:
            await self._stack.aclose()
            # The body's own exception is not the task group's business: handing it over would
            # come back wrapped in an ExceptionGroup and hide a WrongCodeError from the CLI.
            cancelled = exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
            await self._tg.__aexit__(*((exc_type, exc, tb) if cancelled else (None, None, None)))

    async def leave(self, reason: str = "leaving") -> None:
        """Stop listening, say goodbye to every peer and wait (bounded) for them to go."""
        if self._leaving:
            return
        self._leaving = True
        await self._stack.aclose()
        channels = list(self._channels.values())
        await asyncio.gather(*(ch.close(reason) for ch in channels))
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.close_timeout_s)
            for task in pending:
                task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._tg is not None, "use the node as an async context manager"
        task = self._tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- peers ---------------------------------------------------------------------------

    @property
    def peers(self) -> dict[str, PeerInfo]:
        return dict(self._peers)

    async def send(self, peer: str, message: Message, *, stream: Hashable | None = None) -> None:
        """Send to the peer with node id ``peer``; returns once written (backpressure)."""
        channel = self._channels.get(peer)
        if channel is None:
            raise UnknownPeerError(f"no connected peer with node id {peer!r}")
        await channel.send(message, stream=stream)

    async def wait_for_peer(self, peer: str, timeout_s: float) -> None:
        """Return once ``peer`` is connected; ``TimeoutError`` if it is not within ``timeout_s``."""
        if peer in self._channels:
            return
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._peer_waiters.setdefault(peer, []).append(arrived)
        try:
            async with asyncio.timeout(timeout_s):
                await arrived
        finally:
            waiters = self._peer_waiters.get(peer, [])
            if arrived in waiters:
                waiters.remove(arrived)
            if not waiters:
                self._peer_waiters.pop(peer, None)

    async def probe(self, peer: str, payload_bytes: int = 0, timeout_s: float | None = None) -> float:
        """Round-trip seconds of a ping with ``payload_bytes`` to the peer ``peer``."""
        channel = self._channels.get(peer)
        if channel is None:
            raise UnknownPeerError(f"no connected peer with node id {peer!r}")
        return await channel.probe(payload_bytes, timeout_s)

    async def next_event(self, timeout: float | None = None) -> RoomEvent:
        async with asyncio.timeout(timeout):
            return await self._events.get()

    async def events(self) -> AsyncIterator[RoomEvent]:
        while True:
            yield await self._events.get()

    # -- listening and dialling ------------------------------------------------------------

    async def listen(self, host: str, port: int = 0) -> Address:
        """Accept peers on ``host:port``; returns the bound address (port 0 picks one)."""
        def factory() -> Stream:
            # The code as it is now, for each new connection: a host may give its room a fresh one.
            return stream_factory(self.code, Role.LISTENER, self.hello, self.config, on_open=self._on_accept)()

        try:
            server = await asyncio.get_running_loop().create_server(factory, host, port)
        except OSError as exc:
            hint = " (is another room or program on that port? pick another or leave the port out)" if exc.errno == 98 else ""
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenAddressError(f"cannot listen on {host}:{port}: {why}{hint}") from None
        self._stack.push_async_callback(_close_server, server)
        bound = server.sockets[0].getsockname()
        log.info("listening on %s:%d", bound[0], bound[1])
        return bound[0], bound[1]

    async def dial(self, address: Address, *, on_wait: Callable[[float], None] | None = None) -> PeerInfo:
        """Connect to a node at ``address``; raises ``WrongCodeError`` etc. on failure. ``on_wait``
        hears how long the peer makes us wait, when it slows down handshakes from our address."""
        channel = await dial(address, self.code, self.hello, self.config, on_wait)
        if reason := self._refusal(channel):
            await channel.refuse(reason)
            raise ConnectionClosedError(f"not connecting to {address[0]}:{address[1]}: {reason}")
        peer = await self._register(channel, address)
        self._spawn(self._pump(peer, channel))
        return peer

    def _on_accept(self, stream: Stream) -> None:
        # asyncio calls this outside our task group; hand the connection to it at once.
        if self._leaving or self._tg is None:
            stream.transport.close()
            return
        self._spawn(self._accept(stream))

    async def _accept(self, stream: Stream) -> None:
        address: Address = stream.transport.get_extra_info("peername")[:2]
        if self._unauthenticated >= self._max_unauthenticated:
            log.info("refused %s:%d: too many connections waiting to authenticate", *address)
            stream.transport.close()
            return
        self._unauthenticated += 1
        try:
            channel = await self._authenticate(stream, address)
        finally:
            self._unauthenticated -= 1
        if channel is None:
            return
        if reason := self._refusal(channel):
            await channel.refuse(reason)
            return
        peer = await self._register(channel, address)
        await self._pump(peer, channel)

    async def _authenticate(self, stream: Stream, address: Address) -> Channel | None:
        ip = address[0]
        # One deadline from accept to authenticated, whatever the connection waits on.
        deadline = self.limiter.max_delay_s + 2 * self.config.handshake_timeout_s
        try:
            async with asyncio.timeout(deadline), self._gates.hold(ip):
                # One handshake at a time per address, so parallel guesses all pay the delay;
                # the delay is served before taking a handshake slot, so a penalised address
                # never holds one while it waits.
                delay = self.limiter.delay_for(ip)
                if delay:
                    log.info("delaying handshake from %s by %.1f s after earlier failures", ip, delay)
                    stream.transport.write(wait_notice(delay))  # so a joiner waits rather than gives up
                    await asyncio.sleep(delay)
                async with self._handshakes:
                    channel = await handshake(stream, self.config)
        except HandshakeFailed as failed:
            if failed.code_tried:
                self.limiter.failed(ip)
            stream.transport.close()
            log.info("refused %s:%d: %s", ip, address[1], failed.error)
            self._report(HandshakeRefused(address, failed.error, self.limiter.failures(ip), self.limiter.room_failures()))
            return None
        except TimeoutError:
            stream.transport.close()
            log.info("refused %s:%d: it did not authenticate within %g s", ip, address[1], deadline)
            return None
        self.limiter.succeeded(ip)
        return channel

    def _report(self, event: RoomEvent) -> None:
        """Queue an event nobody must wait for; when the queue is full it is dropped, not awaited."""
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("event queue full: dropped %s", type(event).__name__)

    def _refusal(self, channel: Channel) -> str:
        if self._leaving:
            return "the room is closing"
        peer_id = channel.peer.node_id
        if peer_id == self.node_id or peer_id in self._channels:
            return f"node id {peer_id} is already in the room"
        return ""

    async def _register(self, channel: Channel, address: Address) -> PeerInfo:
        peer = PeerInfo(channel.peer.node_id, channel.peer.name, address)
        self._channels[peer.node_id] = channel
        self._peers[peer.node_id] = peer
        log.info("peer %s (%s) joined from %s:%d", peer.name, peer.node_id, *address)
        for waiter in self._peer_waiters.pop(peer.node_id, []):
            if not waiter.done():
                waiter.set_result(None)
        await self._events.put(PeerJoined(peer))
        return peer

    async def _pump(self, peer: PeerInfo, channel: Channel) -> None:
        async def to_queue(message: Message) -> None:
            await self._events.put(MessageFrom(peer, message))

        on_message = self._on_message
        deliver = to_queue if on_message is None else functools.partial(on_message, peer)
        try:
            ended = await channel.run(deliver)
        finally:
            self._channels.pop(peer.node_id, None)
            self._peers.pop(peer.node_id, None)
        log.info("peer %s left: %s", peer.node_id, ended.reason)
        await self._events.put(PeerLeft(peer, ended.reason, ended.error))


class _Gates:
    """Per-address locks that disappear when nobody holds or awaits them."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            await server.wait_closed()
