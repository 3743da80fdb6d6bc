"""Binary codec: one message <-> one frame body.

Layout (see docs/protocol.md): ``u32 header_len (big-endian) | msgpack header | blob bytes...``.
Tensor and chunk bytes are *blobs*: appended raw after the header, never inside msgpack, so encoding
costs one concatenation and decoding returns memoryview slices of the body.
"""

from __future__ import annotations

import dataclasses
import struct
import types
import typing
from collections.abc import Callable
from typing import Any

import msgpack

from peerpipe.protocol.errors import DecodeError, ValidationError
from peerpipe.protocol.limits import DEFAULT_LIMITS, Limits
from peerpipe.protocol.messages import BY_TAG, MESSAGE_TYPES, ComputeRequest, ComputeResult, Message
from peerpipe.protocol.records import (
    LayerTiming,
    LinkStat,
    MemberState,
    NodeInfo,
    Plan,
    PlanStage,
    Sampling,
    SessionSpec,
    TaskInfo,
)
from peerpipe.protocol.tensor import DTYPES, ENCODINGS, TensorData, encoded_nbytes
from peerpipe.protocol.validate import MAX_DIM

_HEADER_LEN = struct.Struct(">I")
_RECORDS = (NodeInfo, PlanStage, Plan, LayerTiming, LinkStat, MemberState, Sampling, SessionSpec, TaskInfo)
_NESTED = (ComputeRequest, ComputeResult)  # messages a compute-batch carries
_TENSOR_KEYS = frozenset({"dtype", "shape", "encoding", "nbytes", "checksum", "offset", "ref"})
_BLOB_KEYS = frozenset({"offset", "nbytes"})


class _Out:
    """Blobs collected while encoding one message, in wire order."""

    __slots__ = ("blobs", "offset")

    def __init__(self) -> None:
        self.blobs: list[bytes | memoryview] = []
        self.offset = 0

    def add(self, data: bytes | memoryview) -> int:
        offset = self.offset
        self.blobs.append(data)
        self.offset += len(data)
        return offset


class _In:
    """The blob area of the frame being decoded and how much of it has been claimed."""

    __slots__ = ("cursor", "limits", "tail")

    def __init__(self, tail: memoryview, limits: Limits) -> None:
        self.tail = tail
        self.cursor = 0
        self.limits = limits

    def take(self, path: str, offset: object, nbytes: int) -> memoryview:
        # Blobs must be contiguous and in header order: no holes, overlaps or trailing bytes to hide in.
        if type(offset) is not int or offset != self.cursor:
            raise DecodeError(f"{path}: blob offset {offset!r} should be {self.cursor}")
        end = self.cursor + nbytes
        if end > len(self.tail):
            raise DecodeError(f"{path}: blob of {nbytes} bytes runs past the end of the frame")
        self.cursor = end
        return self.tail[offset:end]


_Encode = Callable[[Any, _Out], Any]
_Decode = Callable[[Any, _In, str], Any]


def _expect(path: str, raw: object, kind: type | tuple[type, ...], what: str) -> None:
    # type() rather than isinstance(): msgpack bools must not pass as ints.
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if type(raw) not in kinds:
        raise DecodeError(f"{path}: expected {what}, got {type(raw).__name__}")


def _expect_keys(path: str, raw: object, keys: frozenset[str]) -> dict[str, Any]:
    _expect(path, raw, dict, "a map")
    assert isinstance(raw, dict)
    if raw.keys() != keys:
        missing = sorted(keys - raw.keys())
        unknown = sorted(str(k) for k in raw.keys() - keys)
        raise DecodeError(f"{path}: missing fields {missing}, unknown fields {unknown}")
    return raw


def _scalar(kind: type, kinds: tuple[type, ...], what: str) -> tuple[_Encode, _Decode]:
    def enc(value: Any, out: _Out) -> Any:
        return value

    def dec(raw: Any, inp: _In, path: str) -> Any:
        _expect(path, raw, kinds, what)
        return kind(raw)

    return enc, dec


def _encode_blob(value: bytes | memoryview, out: _Out) -> dict[str, int]:
    return {"offset": out.add(value), "nbytes": len(value)}


def _decode_blob(raw: Any, inp: _In, path: str) -> memoryview:
    fields = _expect_keys(path, raw, _BLOB_KEYS)
    nbytes = fields["nbytes"]
    _expect(path + ".nbytes", nbytes, int, "an int")
    if not 0 <= nbytes <= inp.limits.max_frame_bytes:
        raise DecodeError(f"{path}: blob length {nbytes} is out of range")
    return inp.take(path, fields["offset"], nbytes)


def _encode_tensor(value: TensorData, out: _Out) -> dict[str, Any]:
    return {
        "dtype": value.dtype,
        "shape": list(value.shape),
        "encoding": value.encoding,
        "nbytes": value.nbytes,
        "checksum": value.checksum,
        "offset": None if value.ref is not None else out.add(value.data),
        "ref": value.ref,
    }


def _decode_tensor(raw: Any, inp: _In, path: str) -> TensorData:
    fields = _expect_keys(path, raw, _TENSOR_KEYS)
    dtype, shape, encoding = fields["dtype"], fields["shape"], fields["encoding"]
    nbytes, checksum, ref = fields["nbytes"], fields["checksum"], fields["ref"]
    if type(dtype) is not str or dtype not in DTYPES:
        raise DecodeError(f"{path}.dtype: unknown dtype {dtype!r}")
    if type(encoding) is not str or encoding not in ENCODINGS:
        raise DecodeError(f"{path}.encoding: unknown encoding {encoding!r}")
    _expect(path + ".shape", shape, list, "a list")
    if len(shape) > inp.limits.max_dims:
        raise DecodeError(f"{path}.shape: {len(shape)} dimensions, limit is {inp.limits.max_dims}")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            raise DecodeError(f"{path}.shape: invalid dimension {dim!r}")
    _expect(path + ".nbytes", nbytes, int, "an int")
    _expect(path + ".checksum", checksum, int, "an int")
    expected = encoded_nbytes(dtype, tuple(shape), encoding)
    if nbytes != expected:
        raise DecodeError(f"{path}: {dtype}{shape} needs {expected} bytes, header says {nbytes}")
    if nbytes > inp.limits.max_tensor_bytes:
        raise DecodeError(f"{path}: tensor of {nbytes} bytes exceeds limit {inp.limits.max_tensor_bytes}")
    if ref is None:
        data: bytes | memoryview = inp.take(path, fields["offset"], nbytes)
    else:
        _expect(path + ".ref", ref, str, "a string")
        if fields["offset"] is not None:
            raise DecodeError(f"{path}: a placeholder tensor must have offset nil")
        data = b""
    try:
        tensor = TensorData(dtype, tuple(shape), data, encoding, checksum, ref)
    except ValidationError as exc:
        raise DecodeError(f"{path}: {exc}") from None
    tensor.verify()
    return tensor


def _record(cls: type) -> tuple[_Encode, _Decode]:
    schema = _compile_fields(cls)
    keys = frozenset(name for name, _, _ in schema)

    def enc(value: Any, out: _Out) -> dict[str, Any]:
        return {name: encode(getattr(value, name), out) for name, encode, _ in schema}

    def dec(raw: Any, inp: _In, path: str) -> Any:
        fields = _expect_keys(path, raw, keys)
        # Schema order, not the peer's map order, decides blob order.
        kwargs = {name: decode(fields[name], inp, f"{path}.{name}") for name, _, decode in schema}
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            raise DecodeError(f"{path}: {exc}") from None

    return enc, dec


def _tuple(item: tuple[_Encode, _Decode]) -> tuple[_Encode, _Decode]:
    enc_item, dec_item = item

    def enc(value: Any, out: _Out) -> list[Any]:
        return [enc_item(v, out) for v in value]

    def dec(raw: Any, inp: _In, path: str) -> tuple[Any, ...]:
        _expect(path, raw, list, "a list")
        return tuple(dec_item(v, inp, f"{path}[{i}]") for i, v in enumerate(raw))

    return enc, dec


def _optional(item: tuple[_Encode, _Decode]) -> tuple[_Encode, _Decode]:
    enc_item, dec_item = item

    def enc(value: Any, out: _Out) -> Any:
        return None if value is None else enc_item(value, out)

    def dec(raw: Any, inp: _In, path: str) -> Any:
        return None if raw is None else dec_item(raw, inp, path)

    return enc, dec


def _converter(tp: Any) -> tuple[_Encode, _Decode]:
    if tp is bool:
        return _scalar(bool, (bool,), "a bool")
    if tp is int:
        return _scalar(int, (int,), "an int")
    if tp is float:
        return _scalar(float, (float, int), "a number")
    if tp is str:
        return _scalar(str, (str,), "a string")
    if tp is TensorData:
        return _encode_tensor, _decode_tensor
    if tp in _RECORDS or tp in _NESTED:
        return _record(tp)
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) and set(args) == {bytes, memoryview}:
        return _encode_blob, _decode_blob
    if isinstance(tp, types.UnionType) and len(args) == 2 and type(None) in args:
        return _optional(_converter(next(a for a in args if a is not type(None))))
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _tuple(_converter(args[0]))
    raise TypeError(f"the codec has no wire form for {tp!r}")


def _compile_fields(cls: type) -> list[tuple[str, _Encode, _Decode]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, *_converter(hints[f.name])) for f in dataclasses.fields(cls)]


_SCHEMAS: dict[type, tuple[_Encode, _Decode]] = {cls: _record(cls) for cls in MESSAGE_TYPES}
_TENSOR_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] is TensorData)
    for cls in MESSAGE_TYPES
}


def tensor_fields(cls: type[Message]) -> tuple[str, ...]:
    """Names of the top-level ``TensorData`` fields of a message class."""
    return _TENSOR_FIELDS[cls]


def encode(msg: Message) -> bytes:
    """Encode one message as a frame body (the transport adds the outer length and encryption)."""
    schema = _SCHEMAS.get(type(msg))
    if schema is None:
        raise ValidationError(f"cannot encode {type(msg).__name__}: not a protocol message")
    out = _Out()
    fields = schema[0](msg, out)
    header = msgpack.packb({"tag": msg.TAG, "fields": fields}, use_bin_type=True)
    return b"".join([_HEADER_LEN.pack(len(header)), header, *out.blobs])


def decode(body: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode one frame body. Raises ``DecodeError`` (or its ``ChecksumError``) for any bad input.

    Tensor and chunk data in the result are memoryview slices of ``body``: keep ``body`` unchanged
    while they are in use.
    """
    view = memoryview(body)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if len(view) > limits.max_frame_bytes:
        raise DecodeError(f"frame of {len(view)} bytes exceeds limit {limits.max_frame_bytes}")
    if len(view) < _HEADER_LEN.size:
        raise DecodeError(f"frame of {len(view)} bytes is too short for a header length")
    (header_len,) = _HEADER_LEN.unpack_from(view)
    if header_len > limits.max_header_bytes:
        raise DecodeError(f"header of {header_len} bytes exceeds limit {limits.max_header_bytes}")
    header_end = _HEADER_LEN.size + header_len
    if header_end > len(view):
        raise DecodeError(f"header length {header_len} runs past the end of a {len(view)}-byte frame")
    try:
        header = msgpack.unpackb(
            view[_HEADER_LEN.size : header_end],
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_string_bytes,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
        )
    except Exception as exc:  # msgpack signals malformed input with several unrelated types
        raise DecodeError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    top = _expect_keys("header", header, frozenset({"tag", "fields"}))
    tag = top["tag"]
    cls = BY_TAG.get(tag) if type(tag) is str else None
    if cls is None:
        raise DecodeError(f"unknown message tag {tag!r}")
    inp = _In(view[header_end:], limits)
    msg = _SCHEMAS[cls][1](top["fields"], inp, tag)
    if inp.cursor != len(inp.tail):
        raise DecodeError(f"{tag}: {len(inp.tail) - inp.cursor} trailing bytes after the last blob")
    return msg
