"""Host and Member: the two ways into a room, both thin layers over ``RoomNode``."""

from __future__ import annotations

import logging
from collections.abc import Callable

from peerpipe.room.codes import RoomCode
from peerpipe.room.discovery import Advertiser, find_host
from peerpipe.room.node import PeerInfo, RoomNode
from peerpipe.transport import Address

log = logging.getLogger(__name__)


class Host(RoomNode):
    """Opens a room: listens for members and (by default) advertises the nameplate over mDNS."""

    address: Address | None = None
    _advertiser: Advertiser | None = None

    async def open(self, listen: Address, *, advertise: bool = True) -> Address:
        """Listen on ``listen`` (port 0 picks one) and announce the room on that interface only."""
        self.address = await self.listen(*listen)
        if advertise:
            await self._advertise()
        return self.address

    async def _advertise(self) -> None:
        assert self.address is not None
        advertiser = Advertiser(self.code.nameplate, self.address[0], self.address[1], self.node_id)
        await advertiser.__aenter__()
        self._advertiser = advertiser
        self._stack.push_async_callback(advertiser.__aexit__, None, None, None)

    async def rotate_code(self, code: RoomCode) -> None:
        """From now on only ``code`` opens the room (connections already open stay); mDNS
        announces its nameplate instead of the old one, and guesses at the old code no longer
        count against the room as a whole."""
        self.code = code
        self.limiter.forget_room()
        if self._advertiser is not None:
            old, self._advertiser = self._advertiser, None
            await old.__aexit__(None, None, None)  # its callback on the stack is then a no-op
            await self._advertise()


class Member(RoomNode):
    """Joins a room by code: finds the host by mDNS on ``interface`` or uses ``peer`` directly."""

    host: PeerInfo | None = None

    async def join(
        self,
        peer: Address | None = None,
        *,
        interface: str = "127.0.0.1",
        discovery_timeout_s: float = 10.0,
        on_wait: Callable[[float], None] | None = None,
    ) -> PeerInfo:
        if peer is None:
            found = await find_host(self.code.nameplate, discovery_timeout_s, interface)
            peer = (found.address, found.port)
        self.host = await self.dial(peer, on_wait=on_wait)
        return self.host
