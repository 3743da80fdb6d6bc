"""Hosts and members in one process over real loopback sockets (no mDNS here)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest

from peerpipe.protocol import ComputeRequest, Heartbeat, TensorData
from peerpipe.room import (
    FailureLimiter,
    HandshakeRefused,
    Host,
    Member,
    MessageFrom,
    PeerJoined,
    PeerLeft,
    RoomEvent,
    parse_code,
)
from peerpipe.transport import RecordAuthError, TransportConfig, TransportTimeoutError, WrongCodeError

T = TypeVar("T")
CODE = parse_code("7-amber-falcon")
LOOPBACK = ("127.0.0.1", 0)


def arun(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def next_of(node: Host | Member, kind: type[T], timeout: float = 5.0) -> T:
    """The next event of ``kind``, skipping others."""
    async with asyncio.timeout(timeout):
        while True:
            event: RoomEvent = await node.next_event()
            if isinstance(event, kind):
                return event


def test_join_exchange_and_polite_leave() -> None:
    async def main() -> None:
        async with Host(CODE, name="h") as host:
            addr = await host.open(LOOPBACK, advertise=False)
            async with Member(CODE, name="m") as member:
                info = await member.join(addr)
                assert info.node_id == host.node_id and info.name == "h"
                joined = await next_of(host, PeerJoined)
                assert joined.peer.node_id == member.node_id and set(host.peers) == {member.node_id}
                await member.send(host.node_id, Heartbeat(0.25, "idle"))
                got = await next_of(host, MessageFrom)
                assert got.message == Heartbeat(0.25, "idle") and got.peer.name == "m"
                await host.send(member.node_id, Heartbeat(0.5, "busy"))
                assert (await next_of(member, MessageFrom)).message == Heartbeat(0.5, "busy")
            left = await next_of(host, PeerLeft)
            assert left.error is None and left.peer.node_id == member.node_id and host.peers == {}

    arun(main())


def test_heartbeat_overtakes_a_big_transfer_and_tensor_arrives_intact() -> None:
    arr = np.random.default_rng(0).standard_normal((1, 12 * 1024 * 1024 // 4 * 4), dtype=np.float32)  # 48 MiB

    async def main() -> None:
        async with Host(CODE) as host:
            addr = await host.open(LOOPBACK, advertise=False)
            async with Member(CODE) as member:
                await member.join(addr)
                await next_of(host, PeerJoined)
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(
                        member.send(host.node_id, ComputeRequest("big", TensorData.from_numpy(arr)))
                    )
                    await asyncio.sleep(0)  # let the transfer start first
                    tg.create_task(member.send(host.node_id, Heartbeat(0.9, "busy")))
                    first = await next_of(host, MessageFrom, timeout=15)
                    second = await next_of(host, MessageFrom, timeout=15)
                assert first.message == Heartbeat(0.9, "busy")
                assert isinstance(second.message, ComputeRequest)
                np.testing.assert_array_equal(second.message.input_tensor.to_numpy(), arr)

    arun(main(), timeout=60)


def test_wrong_code_fails_on_both_sides() -> None:
    async def main() -> None:
        async with Host(CODE) as host:
            addr = await host.open(LOOPBACK, advertise=False)
            async with Member(parse_code("7-amber-fox")) as member:
                with pytest.raises(WrongCodeError, match="room code is wrong"):
                    await member.join(addr)
            refused = await next_of(host, HandshakeRefused)
            assert isinstance(refused.error, WrongCodeError) and host.peers == {}

    arun(main())


def test_repeat_offender_is_slowed_down() -> None:
    limiter = FailureLimiter(base_delay_s=0.4, free_failures=1)

    async def attempt(addr: tuple[str, int], code: str) -> float:
        t0 = time.monotonic()
        async with Member(parse_code(code)) as member:
            try:
                await member.join(addr)
            except WrongCodeError:
                pass
        return time.monotonic() - t0

    async def main() -> None:
        async with Host(CODE, limiter=limiter) as host:
            addr = await host.open(LOOPBACK, advertise=False)
            quick = [await attempt(addr, "7-amber-fox"), await attempt(addr, "7-amber-fox")]
            assert max(quick) < 0.4
            for _ in quick:
                await next_of(host, HandshakeRefused)
            assert limiter.failures("127.0.0.1") == 2
            assert await attempt(addr, "7-amber-falcon") >= 0.4  # even the right code waits now
            assert limiter.failures("127.0.0.1") == 0

    arun(main())


def test_lost_connection_is_reported_as_left_with_error() -> None:
    async def main() -> None:
        async with Host(CODE) as host:
            addr = await host.open(LOOPBACK, advertise=False)
            async with Member(CODE) as member:
                await member.join(addr)
                await next_of(host, PeerJoined)
                member._channels[host.node_id].transport.abort()
                left = await next_of(host, PeerLeft)
                assert left.error is not None and "lost" in left.reason
                host_left = await next_of(member, PeerLeft)
                assert host_left.error is not None

    arun(main())


def test_members_can_listen_and_dial_each_other() -> None:
    async def main() -> None:
        async with Member(CODE, name="a") as a, Member(CODE, name="b") as b:
            addr = await a.listen("127.0.0.1", 0)
            peer = await b.dial(addr)
            assert peer.node_id == a.node_id
            await b.send(a.node_id, Heartbeat(0.0, "idle"))
            assert (await next_of(a, MessageFrom)).peer.name == "b"

    arun(main())


async def relay(
    target: tuple[str, int], mangle: Callable[[bytes, int], bytes], log: list[bytes]
) -> tuple[asyncio.Server, tuple[str, int]]:
    """A TCP relay that records joiner->host bytes and lets ``mangle(data, offset)`` change them."""

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, record: bool) -> None:
        offset = 0
        try:
            while data := await r.read(65536):
                if record:
                    log.append(data)
                    data = mangle(data, offset)
                    offset += len(data)
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*target)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(pipe(r, uw, True))
            tg.create_task(pipe(ur, w, False))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


def test_tampered_ciphertext_closes_the_connection_and_wire_has_no_plaintext() -> None:
    # The handshake is 48 (PAKE) + 36 (confirm) bytes, then the Hello record; flip a byte
    # well after the handshake, inside the record carrying our Heartbeat.
    state = {"armed": False}
    log: list[bytes] = []

    def mangle(data: bytes, offset: int) -> bytes:
        if state["armed"]:
            state["armed"] = False
            return data[:-1] + bytes([data[-1] ^ 0x40])
        return data

    async def main() -> None:
        async with Host(CODE) as host:
            addr = await host.open(LOOPBACK, advertise=False)
            server, via = await relay(addr, mangle, log)
            async with server, Member(CODE, name="plaintext-canary-name") as member:
                await member.join(via)
                await next_of(host, PeerJoined)
                await member.send(host.node_id, Heartbeat(0.5, "idle"))
                assert (await next_of(host, MessageFrom)).message == Heartbeat(0.5, "idle")
                state["armed"] = True
                await member.send(host.node_id, Heartbeat(0.75, "busy"))
                left = await next_of(host, PeerLeft)
                assert isinstance(left.error, RecordAuthError)
                assert isinstance((await next_of(member, PeerLeft)).error, Exception)
        wire = b"".join(log)
        assert len(wire) > 100
        for secret in (b"plaintext-canary-name", b"amber", b"falcon", b"heartbeat", b"idle"):
            assert secret not in wire

    arun(main())


def test_silent_client_times_out_in_handshake() -> None:
    config = TransportConfig(handshake_timeout_s=0.3)

    async def main() -> None:
        async with Host(CODE, config=config) as host:
            addr = await host.open(LOOPBACK, advertise=False)
            _, writer = await asyncio.open_connection(*addr)
            refused = await next_of(host, HandshakeRefused)
            assert isinstance(refused.error, TransportTimeoutError)
            writer.close()

    arun(main())


def test_keepalive_measures_rtt_and_keeps_idle_peers() -> None:
    config = TransportConfig(keepalive_s=0.05, idle_timeout_s=0.3)

    async def main() -> None:
        async with Host(CODE, config=config) as host:
            addr = await host.open(LOOPBACK, advertise=False)
            async with Member(CODE, config=config) as member:
                await member.join(addr)
                await asyncio.sleep(0.8)  # longer than the idle timeout: pings keep it alive
                channel = member._channels[host.node_id]
                assert channel.rtt_s is not None and channel.rtt_s < 0.3
                assert set(host.peers) == {member.node_id}

    arun(main())


def test_send_to_unknown_peer_is_typed() -> None:
    from peerpipe.room import UnknownPeerError

    async def main() -> None:
        async with Host(CODE) as host:
            with pytest.raises(UnknownPeerError):
                await host.send("nobody", Heartbeat(0.0, "idle"))

    arun(main())


def test_goodbye_waits_for_queued_transfers() -> None:
    arr = np.arange(6 * 1024 * 1024 // 4, dtype=np.float32).reshape(1, -1)  # 6 chunks

    async def main() -> None:
        async with Host(CODE) as host:
            addr = await host.open(LOOPBACK, advertise=False)
            member = Member(CODE)
            async with member:
                await member.join(addr)
                await next_of(host, PeerJoined)
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(
                        member.send(host.node_id, ComputeRequest("last", TensorData.from_numpy(arr)))
                    )
                    await asyncio.sleep(0)
                    tg.create_task(member.leave("done"))
            got = await next_of(host, MessageFrom)
            assert isinstance(got.message, ComputeRequest) and got.message.task_id == "last"
            left = await next_of(host, PeerLeft)
            assert left.error is None and left.reason == "done"

    arun(main())


def test_messages_in_the_same_read_as_hello_are_handled_like_any_other() -> None:
    """A client sends its Hello and a Ping in one write: the host answers the Ping with a Pong
    and never shows it to the application, as for a Ping that came later."""
    from peerpipe.protocol import PROTOCOL_VERSION, Hello, Ping, Pong
    from peerpipe.transport import Connection, MessageReceived, Role, State

    async def main() -> None:
        async with Host(CODE, name="h") as host:
            ip, port = await host.open(LOOPBACK, advertise=False)
            conn = Connection(CODE, Role.DIALER, Hello(PROTOCOL_VERSION, "raw-client", "raw"))
            reader, writer = await asyncio.open_connection(ip, port)
            writer.write(conn.start())
            # Read until we are open, but send nothing more yet: our confirmation, Hello and the
            # Ping then reach the host together.
            while conn.state is not State.OPEN:
                conn.receive_data(await reader.read(65536))
            writer.write(conn.data_to_send() + conn.send(Ping(77)))
            seen: list[object] = []
            async with asyncio.timeout(5):  # the keepalive period is 5 s: a Pong comes sooner
                while Pong(77) not in seen:
                    data = await reader.read(65536)
                    assert data, "the host closed the connection"
                    seen += [e.message for e in conn.receive_data(data) if isinstance(e, MessageReceived)]
            writer.close()
            # Everything the application saw of this client: a join and a leave, no Ping.
            events = []
            while not any(isinstance(e, PeerLeft) for e in events):
                events.append(await host.next_event(timeout=5))
            assert [type(e) for e in events] == [PeerJoined, PeerLeft]
            assert all(e.peer.node_id == "raw-client" for e in events)

    arun(main())
