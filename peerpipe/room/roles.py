"""Host and Member: the two ways into a room, both thin layers over ``RoomNode``."""

from __future__ import annotations

import logging

from peerpipe.room.discovery import Advertiser, find_host
from peerpipe.room.node import PeerInfo, RoomNode
from peerpipe.transport import Address

log = logging.getLogger(__name__)


class Host(RoomNode):
    """Opens a room: listens for members and (by default) advertises the nameplate over mDNS."""

    address: Address | None = None

    async def open(self, listen: Address, *, advertise: bool = True) -> Address:
        """Listen on ``listen`` (port 0 picks one) and announce the room on that interface only."""
        self.address = await self.listen(*listen)
        if advertise:
            advertiser = Advertiser(self.code.nameplate, self.address[0], self.address[1], self.node_id)
            await self._stack.enter_async_context(advertiser)
        return self.address


class Member(RoomNode):
    """Joins a room by code: finds the host by mDNS on ``interface`` or uses ``peer`` directly."""

    host: PeerInfo | None = None

    async def join(
        self, peer: Address | None = None, *, interface: str = "127.0.0.1", discovery_timeout_s: float = 10.0
    ) -> PeerInfo:
        if peer is None:
            found = await find_host(self.code.nameplate, discovery_timeout_s, interface)
            peer = (found.address, found.port)
        self.host = await self.dial(peer)
        return self.host
