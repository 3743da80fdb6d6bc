"""Limits that bound what a peer can make us parse or allocate."""

from __future__ import annotations

from dataclasses import dataclass

from peerpipe.protocol.errors import ValidationError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds enforced by ``decode``, ``split`` and ``Reassembler``.

    Every check happens before any buffer sized by the peer is allocated, so a hostile header can
    cost us at most ``max_header_bytes`` of parsing.
    """

    # One chunk plus its header must always fit in a frame, with room to spare for a single-frame
    # tensor of up to 64 MiB (the size at which chunking stops paying off on a LAN).
    max_frame_bytes: int = 64 * MiB + 64 * KiB
    max_header_bytes: int = 1 * MiB
    max_tensor_bytes: int = 4 * GiB
    chunk_bytes: int = 1 * MiB
    max_chunks: int = 65536
    max_pending_tensors: int = 64
    max_pending_bytes: int = 4 * GiB
    chunk_timeout_s: float = 30.0
    max_string_bytes: int = 64 * KiB
    max_array_len: int = 4096
    max_map_len: int = 64
    max_dims: int = 8

    def __post_init__(self) -> None:
        for name in (
            "max_frame_bytes",
            "max_header_bytes",
            "max_tensor_bytes",
            "chunk_bytes",
            "max_chunks",
            "max_pending_tensors",
            "max_pending_bytes",
            "max_string_bytes",
            "max_array_len",
            "max_map_len",
            "max_dims",
        ):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValidationError(f"Limits.{name} must be a positive int, got {value!r}")
        if not (isinstance(self.chunk_timeout_s, (int, float)) and self.chunk_timeout_s > 0):
            raise ValidationError(f"Limits.chunk_timeout_s must be > 0, got {self.chunk_timeout_s!r}")
        if self.max_header_bytes + 4 > self.max_frame_bytes:
            raise ValidationError("Limits.max_header_bytes must leave room in max_frame_bytes")
        # A chunk frame carries chunk_bytes of data plus a small header.
        if self.chunk_bytes + 4 * KiB > self.max_frame_bytes:
            raise ValidationError("Limits.chunk_bytes must be at least 4 KiB below max_frame_bytes")


DEFAULT_LIMITS = Limits()
