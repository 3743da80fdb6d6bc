"""``TensorData``: a tensor as it travels on the wire, independent of any compute framework."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peerpipe.dtypes import ITEMSIZE
from peerpipe.protocol.errors import ChecksumError, ValidationError
from peerpipe.protocol.validate import MAX_DIM, MAX_DIMS, check_id

if TYPE_CHECKING:
    import numpy as np

DTYPES = frozenset(ITEMSIZE)
# Each encoding defines its byte length as a function of dtype and shape. "raw": the values in
# ``dtype``. "q8b64": a float tensor quantized along its last axis in blocks of Q8_BLOCK values,
# each block one float16 scale (its absolute maximum / 127) and int8 values; ``dtype`` is what the
# receiver decodes it to. The data is every row's int8 values (rows x width bytes), then every
# row's scales (rows x blocks x 2 bytes). "f8b64": the same layout with float8 e4m3 values (the
# "fn" variant: no infinities) and each block's scale its absolute maximum / 448. "shm": the raw values lie in shared memory on the
# receiver's machine; the data is a reference to them (transport/shared_memory.py), SHM_REF_BYTES long.
ENCODINGS = frozenset({"raw", "q8b64", "f8b64", "shm"})
BLOCK_ENCODINGS = frozenset({"q8b64", "f8b64"})  # a byte per value and a float16 scale per block
Q8_BLOCK = 64
SHM_REF_BYTES = 40
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16"})
SHM_DTYPES = FLOAT_DTYPES | {"int64"}  # hidden states, and token ids sent ahead

# bfloat16 has no numpy dtype: it is carried as its raw 16-bit patterns.
_NUMPY_NAME = {"bfloat16": "uint16"}
_WIRE_NAMES: dict[tuple[object, str | None], str] = {}  # checked pairs (numpy dtype, dtype asked for)


def encoded_nbytes(dtype: str, shape: tuple[int, ...], encoding: str = "raw") -> int:
    """Byte length of a tensor's data for this dtype, shape and encoding (validated by the caller)."""
    if encoding in BLOCK_ENCODINGS:
        width = shape[-1] if shape else 1
        rows = math.prod(shape[:-1]) if shape else 1
        return rows * width + rows * -(-width // Q8_BLOCK) * 2
    if encoding == "shm":
        return SHM_REF_BYTES
    return math.prod(shape) * ITEMSIZE[dtype]


def as_byte_view(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    if isinstance(data, bytes):
        return data
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        # cast() is a zero-copy reinterpretation; it refuses non-contiguous views.
        if not view.c_contiguous:
            raise ValidationError("tensor data must be a C-contiguous buffer")
        view = view.cast("B")
    return view


@dataclass(frozen=True, slots=True)
class TensorData:
    """A tensor's metadata and bytes.

    ``data`` is kept as given (``bytes`` or a ``memoryview``), never copied: decoded tensors are views
    into the received frame. ``checksum`` is the CRC-32 of ``data``; it is computed when omitted.

    A *placeholder* (``ref`` set, ``data`` empty) stands for a tensor whose bytes travel separately as
    ``tensor-chunk`` messages with ``tensor_id == ref``; see ``split`` and ``Reassembler``.
    """

    dtype: str
    shape: tuple[int, ...]
    # Left out of repr: a tensor printed in a log or error must not flood it.
    data: bytes | memoryview = field(default=b"", repr=False)
    encoding: str = "raw"
    checksum: int | None = None
    ref: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValidationError(f"unknown tensor dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.encoding not in ENCODINGS:
            raise ValidationError(f"unknown tensor encoding {self.encoding!r}")
        allowed = SHM_DTYPES if self.encoding == "shm" else FLOAT_DTYPES
        if self.encoding != "raw" and self.dtype not in allowed:
            kind = "float or int64" if self.encoding == "shm" else "float"
            raise ValidationError(f"encoding {self.encoding!r} is for {kind} tensors, not {self.dtype}")
        if not isinstance(self.shape, tuple) or len(self.shape) > MAX_DIMS:
            raise ValidationError(f"tensor shape must be a tuple of at most {MAX_DIMS} ints")
        for dim in self.shape:
            if type(dim) is not int or not 0 <= dim <= MAX_DIM:
                raise ValidationError(f"tensor shape {self.shape!r} has an invalid dimension {dim!r}")
        if self.encoding in BLOCK_ENCODINGS and (not self.shape or self.shape[-1] < 1):
            raise ValidationError(f"a {self.encoding} tensor has rows of at least one value, not shape {self.shape}")
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise ValidationError(f"tensor data must be bytes or memoryview, got {type(self.data).__name__}")
        object.__setattr__(self, "data", as_byte_view(self.data))
        if self.ref is not None:
            check_id("tensor ref", self.ref)
            if len(self.data) != 0:
                raise ValidationError("a placeholder tensor (ref set) must carry no data")
            if self.checksum is None:
                raise ValidationError("a placeholder tensor needs the checksum of the chunked data")
        elif len(self.data) != self.nbytes:
            raise ValidationError(
                f"tensor {self.dtype}{list(self.shape)} needs {self.nbytes} bytes, got {len(self.data)}"
            )
        if self.checksum is None:
            object.__setattr__(self, "checksum", zlib.crc32(self.data))
        elif type(self.checksum) is not int or not 0 <= self.checksum <= 0xFFFFFFFF:
            raise ValidationError(f"tensor checksum must be a u32, got {self.checksum!r}")

    @property
    def nbytes(self) -> int:
        """Length of the tensor's data on the wire (also for a placeholder, whose data is elsewhere)."""
        return encoded_nbytes(self.dtype, self.shape, self.encoding)

    @property
    def is_placeholder(self) -> bool:
        return self.ref is not None

    def verify(self, tensor_id: str | None = None) -> None:
        """Raise ``ChecksumError`` if ``data`` does not match ``checksum``."""
        if self.ref is not None:
            return
        actual = zlib.crc32(self.data)
        if actual != self.checksum:
            raise ChecksumError(
                f"tensor {self.dtype}{list(self.shape)} is corrupt: crc32 {actual:#010x}, "
                f"sender said {self.checksum:#010x}",
                tensor_id,
            )

    @classmethod
    def from_numpy(cls, arr: np.ndarray, *, dtype: str | None = None) -> TensorData:
        """Wrap a numpy array without copying it (unless it is not C-contiguous).

        Pass ``dtype="bfloat16"`` with a ``uint16`` array holding bfloat16 bit patterns.
        """
        import numpy as np

        # Not ascontiguousarray(): it turns 0-d arrays into 1-d ones.
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        # Keyed by (numpy dtype, asked-for name): str() and np.dtype() of a dtype cost several µs
        # each, and a decode step sends its token ids this way.
        key = (arr.dtype, dtype)
        name = _WIRE_NAMES.get(key)
        if name is None:
            name = dtype if dtype is not None else str(arr.dtype)
            if name not in DTYPES:
                raise ValidationError(f"numpy dtype {arr.dtype} has no wire dtype")
            if np.dtype(_NUMPY_NAME.get(name, name)) != arr.dtype:
                raise ValidationError(f"cannot send a {arr.dtype} array as {name}")
            _WIRE_NAMES[key] = name
        view = memoryview(arr.reshape(-1).view(np.uint8))
        return cls(dtype=name, shape=tuple(int(d) for d in arr.shape), data=view)

    def to_numpy(self) -> np.ndarray:
        """A numpy view of ``data`` (read-only when ``data`` is); bfloat16 comes back as ``uint16``."""
        import numpy as np

        if self.ref is not None:
            raise ValidationError("a placeholder tensor has no data yet; feed it through a Reassembler")
        if self.encoding != "raw":
            raise ValidationError(f"a {self.encoding} tensor is decoded by its codec, not viewed as numpy")
        arr = np.frombuffer(self.data, dtype=_NUMPY_NAME.get(self.dtype, self.dtype))
        return arr.reshape(self.shape)


def chunk_span(index: int, total_chunks: int, total_bytes: int) -> tuple[int, int]:
    """Byte range ``[start, end)`` of chunk ``index``: chunks are ``ceil(total/n)`` bytes, the last
    one shorter. Deriving it (rather than sending offsets) makes every chunk's length checkable."""
    size = -(-total_bytes // total_chunks)
    start = index * size
    return start, min(total_bytes, start + size)
