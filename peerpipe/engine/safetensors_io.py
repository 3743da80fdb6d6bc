"""A reader for safetensors files that reads only the tensors asked for, and counts its bytes.

We parse the format ourselves (8-byte little-endian header length, a JSON header, raw data)
rather than memory-map it: every byte comes through ``readinto`` into the tensor that keeps it,
so a stage of a big model reads only its own share of the files, can show progress, and can
prove it in a test.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from peerpipe.engine.errors import ModelLoadError

_MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Parse and validate a safetensors header; no tensor data is read."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ModelLoadError(f"{file} is too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise ModelLoadError(f"{file} has a corrupt safetensors header (length {header_len})")
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    except ValueError as exc:
        raise ModelLoadError(f"{file} has a corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file} has a corrupt safetensors header")
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(file, name, info, base, size)
    return entries


def _entry(file: Path, name: str, info: object, base: int, size: int) -> TensorEntry:
    try:
        assert isinstance(info, dict)
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{file}: tensor {name!r} has a malformed header entry") from exc
    numel = 1
    for d in shape:
        if d < 0:
            raise ModelLoadError(f"{file}: tensor {name!r} has a negative dimension")
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not 0 <= begin <= end or base + end > size or end - begin != numel * itemsize:
        raise ModelLoadError(f"{file}: tensor {name!r} has inconsistent offsets (file truncated?)")
    return TensorEntry(name, file, dtype, shape, base + begin, end - begin)


def read_tensors(
    entries: Iterable[TensorEntry], on_bytes: Callable[[int], None] | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """Read the given tensors (in file order) into CPU tensors; returns them and the bytes read."""
    by_file: dict[Path, list[TensorEntry]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e)
    out: dict[str, torch.Tensor] = {}
    total = 0
    for file, items in by_file.items():
        try:
            with file.open("rb", buffering=0) as fh:
                for e in sorted(items, key=lambda x: x.start):
                    tensor = torch.empty(e.shape, dtype=e.dtype)
                    view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if e.nbytes else None
                    fh.seek(e.start)
                    got = 0
                    while view is not None and got < e.nbytes:
                        n = fh.readinto(view[got:])
                        if not n:
                            raise ModelLoadError(f"{file} ended early while reading {e.name!r}")
                        got += n
                    total += e.nbytes
                    if on_bytes is not None:
                        on_bytes(e.nbytes)
                    out[e.name] = tensor
        except OSError as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    return out, total
