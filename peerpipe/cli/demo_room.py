"""A room of local nodes for the demo: one host and members on 127.0.0.1, joined by code.

Everything stays on loopback: the host listens on 127.0.0.1, advertises the nameplate with mDNS
bound to 127.0.0.1, and each member finds it by code through that same interface, then runs
the PAKE handshake. Nothing is sent to any other address.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from peerpipe.room import Host, Member, PeerJoined, RoomCode, generate_code
from peerpipe.room import run as run_loop

LOOPBACK = "127.0.0.1"


async def _form_room(n_nodes: int, say: Callable[[str], None]) -> RoomCode:
    code = generate_code()
    async with Host(code, name="demo-host") as host, contextlib.AsyncExitStack() as stack:
        ip, port = await host.open((LOOPBACK, 0), advertise=True)
        say(f"room code: {code}   (host on {ip}:{port}, mDNS on {LOOPBACK} only)")
        members = [
            await stack.enter_async_context(Member(code, name=f"demo-node-{i}")) for i in range(1, n_nodes)
        ]
        # Members look the host up by code alone, as `peerpipe join CODE` does on a LAN.
        await asyncio.gather(*(m.join(interface=LOOPBACK, discovery_timeout_s=10.0) for m in members))
        joined = 0
        while joined < len(members):
            event = await host.next_event(timeout=10.0)
            if isinstance(event, PeerJoined):
                joined += 1
                say(f"joined: {event.peer.name} (encrypted, authenticated by the code)")
        say(f"room ready: {n_nodes} nodes")
    return code


def run_local_room(n_nodes: int, say: Callable[[str], None] = print) -> RoomCode:
    """Form the room, report each join, then close it politely."""
    return run_loop(_form_room(n_nodes, say))
