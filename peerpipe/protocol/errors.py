"""Errors raised by the protocol layer.

Anything the protocol raises on purpose derives from ``ProtocolError``; any other exception coming out
of ``decode``, ``split`` or ``Reassembler`` is a bug in peerpipe, never the peer's fault.
"""

from __future__ import annotations

from peerpipe.errors import PeerpipeError


class ProtocolError(PeerpipeError):
    """Base of every protocol error."""


class ValidationError(ProtocolError):
    """A message or record was built with a field outside its allowed type or range.

    Raised by the ``__post_init__`` of every message class; ``decode`` re-raises it as ``DecodeError``
    because then the peer sent it.
    """


class DecodeError(ProtocolError):
    """A frame body could not be turned into a message: malformed, over a limit, or invalid.

    The peer sent something this version does not accept; the connection should be closed with a
    ``bye`` that quotes this message.
    """


class ChunkError(ProtocolError):
    """Chunk reassembly failed for one tensor; its buffer has been freed.

    ``tensor_id`` names the tensor (``None`` when the fault is not tied to one tensor).
    """

    def __init__(self, message: str, tensor_id: str | None = None) -> None:
        super().__init__(message)
        self.tensor_id = tensor_id


class ChecksumError(DecodeError, ChunkError):
    """Tensor bytes do not match the CRC-32 their sender computed: corruption or a sender bug."""

    def __init__(self, message: str, tensor_id: str | None = None) -> None:
        ChunkError.__init__(self, message, tensor_id)


class VersionMismatchError(ProtocolError):
    """The peer speaks another protocol version; upgrade peerpipe on one side so both match."""

    def __init__(self, message: str, local: int, remote: int) -> None:
        super().__init__(message)
        self.local = local
        self.remote = remote
