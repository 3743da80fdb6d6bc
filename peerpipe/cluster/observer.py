"""Look at a room without joining its cluster: connect by code, take the host's view, leave.

The host sends its view to every peer as it connects; an observer never sends join-cluster, so
it never appears in the view nor gets a stage.
"""

from __future__ import annotations

import asyncio

from peerpipe.protocol import RoomView
from peerpipe.room import MessageFrom, PeerLeft, RoomCode, RoomError, RoomNode
from peerpipe.transport import Address, TransportTimeoutError


async def fetch_view(code: RoomCode, host: Address, *, timeout_s: float = 10.0, name: str = "observer") -> RoomView:
    async with RoomNode(code, name=name) as node:
        try:
            async with asyncio.timeout(timeout_s):  # (the handshake's time counts too)
                peer = await node.dial(host)
                async for event in node.events():
                    if isinstance(event, MessageFrom) and isinstance(event.message, RoomView):
                        return event.message
                    if isinstance(event, PeerLeft) and event.peer.node_id == peer.node_id:
                        raise RoomError(f"the host closed the connection: {event.reason}")
        except TimeoutError:
            raise TransportTimeoutError(
                f"the host at {host[0]}:{host[1]} did not let us in and send its room view within {timeout_s:g} s"
            ) from None
        raise RoomError("the connection ended before the host sent its view")
