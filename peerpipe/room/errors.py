"""Errors of the room layer: codes, handshake, encrypted records, discovery.

Every message is written for the person at the terminal: it says what went wrong
and, where there is one, what to do about it.
"""

from __future__ import annotations

from peerpipe.errors import PeerpipeError


class RoomError(PeerpipeError):
    """Base of every error raised by ``peerpipe.room``."""


class CodeFormatError(RoomError, ValueError):
    """A room code that cannot be parsed (for instance ``7-amber`` or ``x-a-b``)."""


class HandshakeError(RoomError):
    """The peer broke the handshake protocol (malformed or unexpected handshake frame)."""


class WrongCodeError(HandshakeError):
    """Key confirmation failed: the two sides used different room codes."""

    def __init__(self, message: str = "the room code is wrong (or the host's is): check it and try again"):
        super().__init__(message)


class RecordAuthError(RoomError):
    """An encrypted record failed authentication: tampered, replayed, reordered or truncated."""

    def __init__(
        self,
        message: str = "a record failed authentication (tampered, replayed or reordered): "
        "the connection was closed",
    ) -> None:
        super().__init__(message)


class FrameTooLargeError(RoomError):
    """A frame announced a length above the configured limit; it is rejected before it is read."""


class ConnectionClosedError(RoomError):
    """The connection is closed (by us, by the peer, or because the link was lost)."""


class RoomTimeoutError(RoomError, TimeoutError):
    """A network wait ran past its deadline."""


class IllegalTransitionError(RoomError):
    """A connection was asked to do something its current state does not allow (a bug in the caller)."""


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


class UnknownPeerError(RoomError):
    """``send`` named a peer that is not (or no longer) connected."""


class PeerProtocolError(RoomError):
    """The peer sent a valid message at a moment the protocol does not allow."""
