"""Weights between peers: a node asks a holder for the room's manifest, then for byte ranges of
the tensors (and small files) its stage needs. Part of the closed union in ``messages.py``.

Replies carry ``bytes`` blobs of at most ``MAX_WEIGHT_PIECE``; the transport sends them after
every control and data-plane frame (``is_background``), so weights never queue ahead of answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peerpipe.protocol.errors import ValidationError
from peerpipe.protocol.tensor import as_byte_view
from peerpipe.protocol.validate import MAX_NAME_LEN, need_bool, need_id, need_int, need_str

MAX_WEIGHT_PIECE = 4 * 1024 * 1024
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
MAX_WEIGHT_NAME = 512


def _need_blob(obj: object, name: str, limit: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValidationError(f"{type(obj).__name__}.{name} must be bytes, got {type(value).__name__}")
    view = as_byte_view(value)
    if len(view) > limit:
        raise ValidationError(f"{type(obj).__name__}.{name} carries {len(view)} bytes, more than {limit}")
    object.__setattr__(obj, name, view)


@dataclass(frozen=True, slots=True)
class ManifestRequest:
    """Ask a holder for manifest ``manifest_id`` (the room's, named in its plans)."""

    TAG: ClassVar[str] = "manifest-request"
    request_id: int
    manifest_id: str

    def __post_init__(self) -> None:
        need_int(self, "request_id")
        need_id(self, "manifest_id")


@dataclass(frozen=True, slots=True)
class ManifestReply:
    """The manifest as JSON (``data``), or why not (``error``)."""

    TAG: ClassVar[str] = "manifest-reply"
    request_id: int
    data: bytes | memoryview = field(default=b"", repr=False)
    error: str = ""

    def __post_init__(self) -> None:
        need_int(self, "request_id")
        _need_blob(self, "data", MAX_MANIFEST_BYTES)
        need_str(self, "error")


@dataclass(frozen=True, slots=True)
class WeightRequest:
    """Bytes ``[offset, offset + length)`` of tensor (or small file) ``name`` of manifest ``manifest_id``."""

    TAG: ClassVar[str] = "weight-request"
    request_id: int
    manifest_id: str
    name: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        need_int(self, "request_id")
        need_id(self, "manifest_id")
        need_str(self, "name", MAX_WEIGHT_NAME)
        if not self.name:
            raise ValidationError("WeightRequest.name must not be empty")
        need_int(self, "offset", 0, 1 << 48)
        need_int(self, "length", 1, MAX_WEIGHT_PIECE)


@dataclass(frozen=True, slots=True)
class WeightReply:
    """The bytes asked for, or ``error`` (not held here, unknown manifest, a read failed)."""

    TAG: ClassVar[str] = "weight-reply"
    request_id: int
    data: bytes | memoryview = field(default=b"", repr=False)
    error: str = ""
    busy: bool = False  # the holder is passing answers' hidden states: fetch gently (small pieces, one at a time)

    def __post_init__(self) -> None:
        need_int(self, "request_id")
        _need_blob(self, "data", MAX_WEIGHT_PIECE)
        need_str(self, "error", MAX_NAME_LEN * 4)
        need_bool(self, "busy")
