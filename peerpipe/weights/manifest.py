"""A model copy's manifest: every tensor's dtype, shape and sha256, and the small files (config,
tokenizer, chat template) with theirs. Its id (a hash of it) names the copy: two nodes with the
same id hold the same bytes, and every byte fetched from a peer is checked against it.

The host computes it once per folder and caches it under ``cache_dir()/manifests``, keyed by
the folder's path and its files' sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peerpipe.paths import cache_dir
from peerpipe.weights.errors import ManifestError

FORMAT = 1
ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
MAX_SMALL_FILE = 64 * 1024 * 1024
MAX_TENSORS = 200_000
MAX_FILES = 64
_SAFE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SAFE_TENSOR = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,255}")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_HEX64 = re.compile(r"[0-9a-f]{64}")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str  # a safetensors dtype code: BF16, F32...
    shape: tuple[int, ...]
    nbytes: int
    sha256: str

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
class Manifest:
    model_id: str
    files: tuple[FileRecord, ...]
    tensors: tuple[TensorRecord, ...]

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "model_id": self.model_id,
            "files": [{"name": f.name, "bytes": f.nbytes, "sha256": f.sha256} for f in self.files],
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "bytes": t.nbytes,
                    "sha256": t.sha256,
                }
                for t in self.tensors
            ],
        }
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
            tensors = tuple(_tensor(t) for t in _list(body, "tensors", MAX_TENSORS))
            model_id = body["model_id"]
            if not isinstance(model_id, str) or len(model_id) > 256:
                raise ManifestError("the manifest's model_id is not a short string")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc
        if len({t.name for t in tensors}) != len(tensors) or len({f.name for f in files}) != len(files):
            raise ManifestError("the manifest names a tensor or file twice")
        manifest = cls(model_id, files, tensors)
        if expect_id is not None and manifest.id != expect_id:
            raise ManifestError(f"the manifest hashes to {manifest.id}, not the room's {expect_id}")
        return manifest


def group_of(name: str) -> str:
    m = _LAYER.match(name)
    return f"layer-{int(m.group(1)):05d}" if m else name


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
    if not isinstance(name, str) or not _SAFE_FILE.fullmatch(name) or ".." in name:
        raise ManifestError(f"unsafe file name in manifest: {name!r} (a plain name, no path, is required)")
    if type(nbytes) is not int or not 0 <= nbytes <= MAX_SMALL_FILE:
        raise ManifestError(f"file {name!r} has an invalid size {nbytes!r}")
    return FileRecord(name, nbytes, _sha(item["sha256"]))


def _tensor(item: dict) -> TensorRecord:
    name, dtype, shape, nbytes = item["name"], item["dtype"], item["shape"], item["bytes"]
    if not isinstance(name, str) or not _SAFE_TENSOR.fullmatch(name):
        raise ManifestError(f"invalid tensor name in manifest: {name!r}")
    if dtype not in ITEMSIZE:
        raise ManifestError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or any(type(d) is not int or not 0 <= d < 1 << 40 for d in shape)
    ):
        raise ManifestError(f"tensor {name!r} has an invalid shape {shape!r}")
    if type(nbytes) is not int or nbytes != math.prod(shape) * ITEMSIZE[dtype]:
        raise ManifestError(f"tensor {name!r}: {dtype}{shape} is not {nbytes!r} bytes")
    return TensorRecord(name, dtype, tuple(shape), nbytes, _sha(item["sha256"]))


# -- a local folder ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    path: Path
    offset: int  # absolute, in the file
    nbytes: int


def small_files(folder: Path) -> list[Path]:
    """The config, tokenizer and template files a copy carries besides its tensors."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and p.suffix in SMALL_FILE_SUFFIXES
        and p.name != "model.safetensors.index.json"
        and _SAFE_FILE.fullmatch(p.name)
        and p.stat().st_size <= MAX_SMALL_FILE
    )


def folder_locations(folder: Path) -> dict[str, Located]:
    """Where each tensor and small file of a Hugging Face folder lies."""
    from peerpipe.engine.loader import checkpoint_index

    where = {name: Located(e.file, e.start, e.nbytes) for name, e in checkpoint_index(folder).items()}
    for path in small_files(folder):
        where[file_key(path.name)] = Located(path, 0, path.stat().st_size)
    return where


def file_key(name: str) -> str:
    """How a weight request names a small file (tensor names never contain a slash)."""
    return f"file/{name}"


def hash_range(path: Path, offset: int, nbytes: int, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as fh:
        fh.seek(offset)
        left = nbytes
        while left:
            chunk = fh.read(min(left, 8 << 20))
            if not chunk:
                raise ManifestError(f"{path} ended early")
            digest.update(chunk)
            left -= len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def build_manifest(folder: Path, model_id: str, progress: Progress | None = None) -> Manifest:
    """Hash every tensor and small file of ``folder`` (reads it all once)."""
    from peerpipe.engine.loader import checkpoint_index
    from peerpipe.engine.safetensors_io import DTYPES

    codes = {v: k for k, v in DTYPES.items()}
    entries = sorted(checkpoint_index(folder).values(), key=lambda e: e.name)
    files = small_files(folder)
    total = sum(e.nbytes for e in entries) + sum(p.stat().st_size for p in files)
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    tensors = []
    for e in entries:
        if not _SAFE_TENSOR.fullmatch(e.name):
            raise ManifestError(f"{folder}: tensor name {e.name!r} cannot be shared with peers")
        tensors.append(
            TensorRecord(
                e.name, codes[e.dtype], e.shape, e.nbytes, hash_range(e.file, e.start, e.nbytes, on_bytes)
            )
        )
    records = tuple(
        FileRecord(p.name, p.stat().st_size, hash_range(p, 0, p.stat().st_size, on_bytes)) for p in files
    )
    return Manifest(model_id, records, tuple(tensors))


def _folder_key(folder: Path) -> str:
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.resolve().iterdir() if p.is_file()
    )
    return hashlib.sha256(json.dumps([str(folder.resolve()), files]).encode()).hexdigest()[:32]


def folder_manifest(folder: Path, model_id: str, progress: Progress | None = None) -> Manifest:
    """``build_manifest``, cached until a file of the folder changes."""
    cached = cache_dir() / "manifests" / f"{_folder_key(folder)}.json"
    try:
        return Manifest.from_json(cached.read_bytes())
    except (OSError, ManifestError):
        pass
    manifest = build_manifest(folder, model_id, progress)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(manifest.to_json())
        tmp.replace(cached)
    except OSError:
        pass  # a cache that cannot be written only costs hashing again next time
    return manifest
