"""Errors of the transport: the handshake, encrypted records, frames and connections.

Every message is written for the person at the terminal: it says what went wrong and, where
there is one, what to do about it.
"""

from __future__ import annotations

from peerpipe.errors import PeerpipeError


class TransportError(PeerpipeError):
    """Base of every error raised by ``peerpipe.transport``."""


class HandshakeError(TransportError):
    """The peer broke the handshake protocol (malformed or unexpected handshake frame)."""


class WrongCodeError(HandshakeError):
    """Key confirmation failed: the two sides used different room codes."""

    def __init__(self, message: str = "the room code is wrong (or the host's is): check it and try again"):
        super().__init__(message)


class RecordAuthError(TransportError):
    """An encrypted record failed authentication: tampered, replayed, reordered or truncated."""

    def __init__(
        self,
        message: str = "a record failed authentication (tampered, replayed or reordered): "
        "the connection was closed",
    ) -> None:
        super().__init__(message)


class FrameTooLargeError(TransportError):
    """A frame announced a length above the configured limit; it is rejected before it is read."""


class ConnectionClosedError(TransportError):
    """The connection is closed (by us, by the peer, or because the link was lost)."""


class TransportTimeoutError(TransportError, TimeoutError):
    """A network wait ran past its deadline."""


class IllegalTransitionError(TransportError):
    """A connection was asked to do something its current state does not allow (a bug in the caller)."""


class PeerProtocolError(TransportError):
    """The peer sent a valid message at a moment the protocol does not allow."""
