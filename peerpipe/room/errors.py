"""Errors of the room layer: codes, discovery and peers. The encrypted channel's own errors
(handshake, records, closed connections) are ``peerpipe.transport``'s.

Every message is written for the person at the terminal: it says what went wrong
and, where there is one, what to do about it.
"""

from __future__ import annotations

from peerpipe.errors import PeerpipeError
from peerpipe.transport.errors import TransportError


class RoomError(PeerpipeError):
    """Base of every error raised by ``peerpipe.room``."""


class CodeFormatError(RoomError, ValueError):
    """A room code that cannot be parsed (for instance ``7-amber`` or ``x-a-b``)."""


class DiscoveryError(RoomError):
    """mDNS discovery failed."""


class HostNotFoundError(DiscoveryError):
    """No host advertising the nameplate answered in time."""

    def __init__(self, nameplate: int, timeout: float) -> None:
        super().__init__(
            f"no host for room {nameplate} found on the local network within {timeout:g} s: "
            "check the code, that the host is running, or pass --peer HOST:PORT"
        )
        self.nameplate = nameplate


class ListenAddressError(RoomError):
    """The room cannot accept members on the address asked for: taken, or not this machine's."""


class UnknownPeerError(RoomError):
    """``send`` named a peer that is not (or no longer) connected."""


# What talking to a peer raises when it is gone or unreachable: callers that send on a
# best-effort basis catch exactly these.
LINK_ERRORS: tuple[type[PeerpipeError], ...] = (RoomError, TransportError)
