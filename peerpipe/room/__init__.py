"""Secure rooms: room codes, PAKE-authenticated encrypted connections, LAN discovery.

See docs/transport.md for the handshake, key schedule and record format.
"""

from peerpipe.room.codes import RoomCode, generate_code, parse_code
from peerpipe.room.connection import Closed, Connection, MessageReceived, Opened, State
from peerpipe.room.crypto import Role
from peerpipe.room.discovery import SERVICE_TYPE, Advertiser, Found, default_lan_ip, find_host
from peerpipe.room.errors import (
    CodeFormatError,
    ConnectionClosedError,
    DiscoveryError,
    FrameTooLargeError,
    HandshakeError,
    HostNotFoundError,
    IllegalTransitionError,
    PeerProtocolError,
    RecordAuthError,
    RoomError,
    RoomTimeoutError,
    UnknownPeerError,
    WrongCodeError,
)
from peerpipe.room.node import (
    HandshakeRefused,
    MessageFrom,
    PeerInfo,
    PeerJoined,
    PeerLeft,
    RoomEvent,
    RoomNode,
)
from peerpipe.room.ratelimit import FailureLimiter
from peerpipe.room.room import Host, Member
from peerpipe.room.transport import Address, Channel, TransportConfig, dial, install_event_loop, run

__all__ = [
    "SERVICE_TYPE",
    "Address",
    "Advertiser",
    "Channel",
    "Closed",
    "CodeFormatError",
    "Connection",
    "ConnectionClosedError",
    "DiscoveryError",
    "FailureLimiter",
    "Found",
    "FrameTooLargeError",
    "HandshakeError",
    "HandshakeRefused",
    "Host",
    "HostNotFoundError",
    "IllegalTransitionError",
    "Member",
    "MessageFrom",
    "MessageReceived",
    "Opened",
    "PeerInfo",
    "PeerJoined",
    "PeerLeft",
    "PeerProtocolError",
    "RecordAuthError",
    "Role",
    "RoomCode",
    "RoomError",
    "RoomEvent",
    "RoomNode",
    "RoomTimeoutError",
    "State",
    "TransportConfig",
    "UnknownPeerError",
    "WrongCodeError",
    "default_lan_ip",
    "dial",
    "find_host",
    "generate_code",
    "install_event_loop",
    "parse_code",
    "run",
]
