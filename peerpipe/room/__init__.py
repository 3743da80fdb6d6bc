"""Rooms: short codes, LAN discovery (mDNS), and nodes that keep one encrypted channel per peer
(the channel itself is ``peerpipe.transport``'s).
"""

from peerpipe.room.codes import RoomCode, generate_code, parse_code
from peerpipe.room.discovery import SERVICE_TYPE, Advertiser, Found, default_lan_ip, find_host
from peerpipe.room.errors import (
    LINK_ERRORS,
    CodeFormatError,
    DiscoveryError,
    HostNotFoundError,
    ListenAddressError,
    RoomError,
    UnknownPeerError,
)
from peerpipe.room.node import (
    HandshakeRefused,
    MessageFrom,
    PeerInfo,
    PeerJoined,
    PeerLeft,
    RoomEvent,
    RoomNode,
    Send,
)
from peerpipe.room.ratelimit import FailureLimiter
from peerpipe.room.roles import Host, Member

__all__ = [
    "LINK_ERRORS",
    "SERVICE_TYPE",
    "Advertiser",
    "CodeFormatError",
    "DiscoveryError",
    "FailureLimiter",
    "Found",
    "HandshakeRefused",
    "Host",
    "HostNotFoundError",
    "ListenAddressError",
    "Member",
    "MessageFrom",
    "PeerInfo",
    "PeerJoined",
    "PeerLeft",
    "RoomCode",
    "RoomError",
    "RoomEvent",
    "RoomNode",
    "Send",
    "UnknownPeerError",
    "default_lan_ip",
    "find_host",
    "generate_code",
    "parse_code",
]
