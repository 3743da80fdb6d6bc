"""This node's own copy of a model, as peers see it: its manifest (hashed once, cached until a
file changes) and where each tensor and small file lies. A copy is a Hugging Face folder or one
GGUF file."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peerpipe.paths import cache_dir
from peerpipe.weights.errors import ManifestError
from peerpipe.weights.manifest import (
    GGUF_HEADER,
    MAX_SMALL_FILE,
    SAFE_FILE,
    SAFE_TENSOR,
    FileRecord,
    GGUFInfo,
    Manifest,
    TensorRecord,
    file_key,
)

SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
Progress = Callable[[int, int], None]


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
        and not p.name.startswith("peerpipe-")  # a fetched copy's own bookkeeping (its manifest, lists)
        and SAFE_FILE.fullmatch(p.name)
        and p.stat().st_size <= MAX_SMALL_FILE
    )


def locations(path: Path) -> dict[str, Located]:
    """Where each tensor and small file (or a GGUF's header) of a copy lies."""
    if path.is_file():
        tensors, header = _gguf_tensors(path)
        where = {name: Located(path, offset, nbytes) for name, offset, nbytes, _, _ in tensors}
        where[GGUF_HEADER] = Located(path, 0, header)
        return where
    from peerpipe.engine.loader import checkpoint_index

    where = {name: Located(e.file, e.start, e.nbytes) for name, e in checkpoint_index(path).items()}
    for p in small_files(path):
        where[file_key(p.name)] = Located(p, 0, p.stat().st_size)
    return where


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


def _gguf_tensors(path: Path) -> tuple[list[tuple[str, int, int, int, tuple[int, ...]]], int]:
    """(name, offset, bytes, GGML type, dims) of every tensor of a GGUF, and its header's length."""
    from peerpipe.engine.gguf_file import tensor_bytes
    from peerpipe.engine.gguf_header import read_header

    header = read_header(path)
    tensors = [(t.name, t.offset, tensor_bytes(t), t.kind, t.dims) for t in header.tensors]
    first = min((offset for _, offset, _, _, _ in tensors), default=path.stat().st_size)
    return tensors, first


def build_manifest(path: Path, model_id: str, progress: Progress | None = None) -> Manifest:
    """Hash every tensor and small file of a folder, or every tensor and the header of a GGUF
    (reads it all once)."""
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if path.is_file():
        found, header = _gguf_tensors(path)
        total = path.stat().st_size
        header_sha = hash_range(path, 0, header, on_bytes)
        records = []
        for name, offset, nbytes, kind, dims in sorted(found):
            if not SAFE_TENSOR.fullmatch(name):
                raise ManifestError(f"{path}: tensor name {name!r} cannot be shared with peers")
            records.append(TensorRecord(name, f"GGML{kind}", dims, nbytes, hash_range(path, offset, nbytes, on_bytes), offset))
        gguf = GGUFInfo(path.name if path.suffix == ".gguf" else "model.gguf", total, header, header_sha)
        return Manifest(model_id, (), tuple(records), gguf)
    from peerpipe.engine.loader import checkpoint_index
    from peerpipe.engine.safetensors_io import DTYPES

    codes = {v: k for k, v in DTYPES.items()}
    entries = sorted(checkpoint_index(path).values(), key=lambda e: e.name)
    files = small_files(path)
    total = sum(e.nbytes for e in entries) + sum(p.stat().st_size for p in files)
    tensors = []
    for e in entries:
        if not SAFE_TENSOR.fullmatch(e.name):
            raise ManifestError(f"{path}: tensor name {e.name!r} cannot be shared with peers")
        tensors.append(TensorRecord(e.name, codes[e.dtype], e.shape, e.nbytes, hash_range(e.file, e.start, e.nbytes, on_bytes)))
    records = tuple(FileRecord(p.name, p.stat().st_size, hash_range(p, 0, p.stat().st_size, on_bytes)) for p in files)
    return Manifest(model_id, records, tuple(tensors))


def _copy_key(path: Path) -> str:
    path = path.resolve()
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    stamp = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return hashlib.sha256(json.dumps([str(path), stamp]).encode()).hexdigest()[:32]


def copy_manifest(path: Path, model_id: str, progress: Progress | None = None) -> Manifest:
    """``build_manifest``, cached until a file of the copy changes."""
    cached = cache_dir() / "manifests" / f"{_copy_key(path)}.json"
    try:
        return Manifest.from_json(cached.read_bytes())
    except (OSError, ManifestError):
        pass
    manifest = build_manifest(path, model_id, progress)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(manifest.to_json())
        tmp.replace(cached)
    except OSError:
        pass  # a cache that cannot be written only costs hashing again next time
    return manifest
