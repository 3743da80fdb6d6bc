"""Someone guessing the room's code: the host slows their address down but tells a joiner how
long to wait (so the right code still gets in), warns that someone is guessing, and hands out a
fresh code without restarting the room."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import pytest

from peerpipe.protocol import PROTOCOL_VERSION, Hello
from peerpipe.python_api import create_room, join_room
from peerpipe.room import FailureLimiter, Host, Member, RoomNode, find_host, parse_code
from peerpipe.transport import Role, TransportConfig, WrongCodeError
from peerpipe.transport.connection import MAX_WAIT_MS, Closed, Connection, Opened, Throttled, wait_notice

CODE = "7-amber-falcon"


def dialer() -> Connection:
    """A dialer that sent its first message and waits for the listener's."""
    conn = Connection(parse_code(CODE), Role.DIALER, Hello(PROTOCOL_VERSION, "id-a", "a"))
    conn.start()
    return conn


def test_a_wait_notice_is_an_event_and_the_handshake_goes_on() -> None:
    a = Connection(parse_code(CODE), Role.DIALER, Hello(PROTOCOL_VERSION, "id-a", "a"))
    b = Connection(parse_code(CODE), Role.LISTENER, Hello(PROTOCOL_VERSION, "id-b", "b"))
    to_b = a.start()
    assert a.receive_data(wait_notice(3.25)) == [Throttled(3.25)]
    events_a = a.receive_data(b.start())
    events_b = b.receive_data(to_b)
    events_a += a.receive_data(b.data_to_send())
    events_b += b.receive_data(a.data_to_send())
    assert any(isinstance(e, Opened) for e in events_a) and any(isinstance(e, Opened) for e in events_b)


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (struct.pack(">IB", 3, 3) + b"\x00\x00", "malformed wait notice"),
        (struct.pack(">IBI", 5, 3, MAX_WAIT_MS + 1), "more than"),
    ],
)
def test_a_bad_wait_notice_closes_the_connection(frame: bytes, why: str) -> None:
    (event,) = dialer().receive_data(frame)
    assert isinstance(event, Closed) and why in event.reason


def test_a_listener_takes_no_wait_notice() -> None:
    b = Connection(parse_code(CODE), Role.LISTENER, Hello(PROTOCOL_VERSION, "id-b", "b"))
    b.start()
    (event,) = b.receive_data(wait_notice(1.0))
    assert isinstance(event, Closed) and "not a peerpipe node" in event.reason


def test_the_right_code_gets_in_after_wrong_ones_however_short_the_joiners_deadline() -> None:
    asyncio.run(asyncio.wait_for(_right_code_after_wrong_ones(), 30))


async def _right_code_after_wrong_ones() -> None:
    # Each failure makes the next handshake from this address wait 2 s, twice the joiner's own
    # handshake deadline: without the notice the right code would time out.
    limiter = FailureLimiter(base_delay_s=2.0, free_failures=0)
    quick = TransportConfig(handshake_timeout_s=1.0)
    async with Host(parse_code(CODE), name="host", limiter=limiter) as host:
        address = await host.open(("127.0.0.1", 0), advertise=False)
        async with RoomNode(parse_code("7-wrong-guess"), name="guesser", config=quick) as guesser:
            with pytest.raises(WrongCodeError):
                await guesser.dial(address)
        waits: list[float] = []
        async with Member(parse_code(CODE), name="friend", config=quick) as friend:
            peer = await friend.join(address, on_wait=waits.append)
        assert peer.name == "host" and waits == [2.0]


def test_the_host_warns_of_guessing_and_a_fresh_code_shuts_the_old_one_out(warm_bench: None) -> None:
    asyncio.run(asyncio.wait_for(_guessing_then_a_fresh_code(), 60))


async def _guessing_then_a_fresh_code() -> None:
    said: list[str] = []
    warned = asyncio.Event()

    def report(line: str) -> None:
        said.append(line)
        if "guessing" in line:
            warned.set()

    async with contextlib.AsyncExitStack() as stack:
        room = await stack.enter_async_context(create_room(listen=("127.0.0.1", 0), advertise=True, report=report))
        old = str(room.code)
        heard: asyncio.Queue[str] = asyncio.Queue()
        await stack.enter_async_context(
            join_room(old, peer=room.address, on_new_code=lambda code: heard.put_nowait(str(code)))
        )
        for _ in range(5):
            async with RoomNode(parse_code(old.split("-")[0] + "-wrong-guess")) as guesser:
                with pytest.raises(WrongCodeError):
                    await guesser.dial(room.address)
        await asyncio.wait_for(warned.wait(), 10)
        warning = next(line for line in said if "guessing" in line)
        assert "5 wrong code(s) from 127.0.0.1" in warning and "fresh code" in warning

        new = str(await room.rotate_code())
        assert new != old and str(room.code) == new
        assert await asyncio.wait_for(heard.get(), 10) == new  # the member already in stays, and learns it
        found = await find_host(parse_code(new).nameplate, 10.0, "127.0.0.1")  # mDNS announces the new one
        assert found.port == room.address[1]
        # The new code admits (after this address's slow-down, which a success then forgets) ...
        await stack.enter_async_context(join_room(new, peer=room.address))
        await room.wait_for_nodes(3, timeout_s=30)
        # ... and the old one no longer does.
        async with RoomNode(parse_code(old)) as late:
            with pytest.raises(WrongCodeError):
                await late.dial(room.address)
