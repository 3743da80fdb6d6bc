"""A model copy's manifest: every tensor's dtype, shape and sha256, and the small files (config,
tokenizer, chat template) with theirs; for a GGUF file, its header instead of small files and
where each tensor lies. Its id (a hash of it) names the copy: two nodes with the same id hold
the same bytes, and every byte fetched from a peer is checked against it.

A peer's manifest is checked before it is used (``Manifest.from_json``): plain file names (no
path), known dtypes, sizes that agree, tensors inside the file. ``local_copy.py`` makes one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass

from peerpipe.weights.errors import ManifestError

FORMAT = 1
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_TENSORS = 200_000
MAX_FILES = 64
MAX_SMALL_FILE = 64 * 1024 * 1024
SAFE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SAFE_TENSOR = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,255}")
_LAYER = re.compile(r"(?:model\.layers|blk)\.(\d+)\.")  # Hugging Face names, GGUF names
_GGML = re.compile(r"GGML\d{1,3}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str  # a safetensors dtype code (BF16, F32...), or GGML<type id> in a GGUF
    shape: tuple[int, ...]  # a GGUF's dimensions as it lists them, innermost first
    nbytes: int
    sha256: str
    offset: int = 0  # in a GGUF: where the tensor lies in the file

    @property
    def group(self) -> str:
        """The file a fetched copy keeps it in: one per layer, one per other tensor."""
        return group_of(self.name)


@dataclass(frozen=True)
class FileRecord:
    name: str
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class GGUFInfo:
    """A copy that is one GGUF file: its name and size, and its header (metadata and tensor
    index: everything before the first tensor), which travels whole and is checked whole."""

    file: str
    nbytes: int
    header_bytes: int
    header_sha256: str


@dataclass(frozen=True)
class Manifest:
    model_id: str
    files: tuple[FileRecord, ...]
    tensors: tuple[TensorRecord, ...]
    gguf: GGUFInfo | None = None

    def to_json(self) -> bytes:
        tensors = []
        for t in self.tensors:
            item = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes, "sha256": t.sha256}
            if self.gguf is not None:
                item["offset"] = t.offset
            tensors.append(item)
        body: dict[str, object] = {
            "format": FORMAT,
            "model_id": self.model_id,
            "files": [{"name": f.name, "bytes": f.nbytes, "sha256": f.sha256} for f in self.files],
            "tensors": tensors,
        }
        if (g := self.gguf) is not None:
            body["gguf"] = {"file": g.file, "bytes": g.nbytes, "header_bytes": g.header_bytes, "header_sha256": g.header_sha256}
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @property
    def id(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()[:32]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors) + sum(f.nbytes for f in self.files)

    def tensor(self, name: str) -> TensorRecord:
        return self.by_name()[name]

    def by_name(self) -> dict[str, TensorRecord]:
        return self._index

    @functools.cached_property
    def _index(self) -> dict[str, TensorRecord]:
        # Built once: writes, checks and served pieces look a tensor up per piece.
        return {t.name: t for t in self.tensors}

    def layers(self) -> set[int]:
        return {int(m.group(1)) for t in self.tensors if (m := _LAYER.match(t.name))}

    @classmethod
    def from_json(cls, data: bytes | memoryview, expect_id: str | None = None) -> Manifest:
        """Parse and check a manifest a peer sent; ``expect_id``: the id it must hash to."""
        try:
            body = json.loads(bytes(data))
            if body.get("format") != FORMAT:
                raise ManifestError(f"manifest format {body.get('format')!r}; this peerpipe reads {FORMAT}")
            files = tuple(_file(f) for f in _list(body, "files", MAX_FILES))
            gguf = _gguf(body["gguf"]) if "gguf" in body else None
            tensors = tuple(_tensor(t, gguf) for t in _list(body, "tensors", MAX_TENSORS))
            model_id = body["model_id"]
            if not isinstance(model_id, str) or len(model_id) > 256:
                raise ManifestError("the manifest's model_id is not a short string")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc
        if len({t.name for t in tensors}) != len(tensors) or len({f.name for f in files}) != len(files):
            raise ManifestError("the manifest names a tensor or file twice")
        manifest = cls(model_id, files, tensors, gguf)
        if expect_id is not None and manifest.id != expect_id:
            raise ManifestError(f"the manifest hashes to {manifest.id}, not the room's {expect_id}")
        return manifest


def group_of(name: str) -> str:
    m = _LAYER.match(name)
    return f"layer-{int(m.group(1)):05d}" if m else name


def file_key(name: str) -> str:
    """How a weight request names a small file (tensor names never contain a slash)."""
    return f"file/{name}"


GGUF_HEADER = "gguf/header"  # how a weight request names a GGUF's header


def _list(body: dict, key: str, limit: int) -> list:
    items = body[key]
    if not isinstance(items, list) or len(items) > limit:
        raise ManifestError(f"the manifest's {key} is not a list of at most {limit}")
    return items


def _sha(value: object) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ManifestError(f"{value!r} is not a sha256 in hex")
    return value


def _file(item: dict) -> FileRecord:
    name, nbytes = item["name"], item["bytes"]
    if not isinstance(name, str) or not SAFE_FILE.fullmatch(name) or ".." in name:
        raise ManifestError(f"unsafe file name in manifest: {name!r} (a plain name, no path, is required)")
    if type(nbytes) is not int or not 0 <= nbytes <= MAX_SMALL_FILE:
        raise ManifestError(f"file {name!r} has an invalid size {nbytes!r}")
    return FileRecord(name, nbytes, _sha(item["sha256"]))


def _gguf(item: dict) -> GGUFInfo:
    file, nbytes, header = item["file"], item["bytes"], item["header_bytes"]
    if not isinstance(file, str) or not SAFE_FILE.fullmatch(file) or ".." in file or not file.endswith(".gguf"):
        raise ManifestError(f"unsafe GGUF file name in manifest: {file!r}")
    if type(nbytes) is not int or type(header) is not int or not 0 < header <= nbytes < 1 << 44:
        raise ManifestError(f"the GGUF's sizes are invalid ({header!r} of {nbytes!r} bytes)")
    return GGUFInfo(file, nbytes, header, _sha(item["header_sha256"]))


def _tensor(item: dict, gguf: GGUFInfo | None) -> TensorRecord:
    name, dtype, shape, nbytes = item["name"], item["dtype"], item["shape"], item["bytes"]
    if not isinstance(name, str) or not SAFE_TENSOR.fullmatch(name):
        raise ManifestError(f"invalid tensor name in manifest: {name!r}")
    if not (dtype in ITEMSIZE if gguf is None else isinstance(dtype, str) and _GGML.fullmatch(dtype)):
        raise ManifestError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 8 or any(type(d) is not int or not 0 <= d < 1 << 40 for d in shape):
        raise ManifestError(f"tensor {name!r} has an invalid shape {shape!r}")
    if gguf is not None:  # quantized blocks: the file gives the size; the tensor must lie inside it
        offset = item["offset"]
        if type(nbytes) is not int or type(offset) is not int or not gguf.header_bytes <= offset <= offset + nbytes <= gguf.nbytes:
            raise ManifestError(f"tensor {name!r} lies outside the GGUF's data ({offset!r}, {nbytes!r} bytes)")
        return TensorRecord(name, dtype, tuple(shape), nbytes, _sha(item["sha256"]), offset)
    if type(nbytes) is not int or nbytes != math.prod(shape) * ITEMSIZE[dtype]:
        raise ManifestError(f"tensor {name!r}: {dtype}{shape} is not {nbytes!r} bytes")
    return TensorRecord(name, dtype, tuple(shape), nbytes, _sha(item["sha256"]))
