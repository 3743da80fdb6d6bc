"""The encrypted channel between two nodes: a sans-IO connection state machine (PAKE handshake
from a shared secret, AES-GCM records), its asyncio stream and channel, send scheduling, and
link emulation for tests and benchmarks. It knows nothing of rooms, clusters or models.

See docs/transport.md for the handshake, key schedule and record format.
"""

from peerpipe.transport.channel import Address, Channel, Deliver, TransportConfig
from peerpipe.transport.connection import Closed, Connection, MessageReceived, Opened, State
from peerpipe.transport.crypto import Role, Secret
from peerpipe.transport.errors import (
    ConnectionClosedError,
    FrameTooLargeError,
    HandshakeError,
    IllegalTransitionError,
    PeerProtocolError,
    RecordAuthError,
    TransportError,
    TransportTimeoutError,
    WrongCodeError,
)
from peerpipe.transport.loop import install_event_loop, run
from peerpipe.transport.opening import HandshakeFailed, dial, handshake, stream_factory

__all__ = [
    "Address",
    "Channel",
    "Closed",
    "Connection",
    "ConnectionClosedError",
    "Deliver",
    "FrameTooLargeError",
    "HandshakeError",
    "HandshakeFailed",
    "IllegalTransitionError",
    "MessageReceived",
    "Opened",
    "PeerProtocolError",
    "RecordAuthError",
    "Role",
    "Secret",
    "State",
    "TransportConfig",
    "TransportError",
    "TransportTimeoutError",
    "WrongCodeError",
    "dial",
    "handshake",
    "install_event_loop",
    "run",
    "stream_factory",
]
