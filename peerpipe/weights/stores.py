"""Which store holds a copy: a folder of safetensors groups (``store.py``) or one sparse GGUF
(``gguf_store.py``)."""

from __future__ import annotations

from pathlib import Path

from peerpipe.weights.errors import ManifestError
from peerpipe.weights.gguf_store import GGUFStore
from peerpipe.weights.manifest import Manifest
from peerpipe.weights.store import MANIFEST, Store, store_root


def open_store(manifest: Manifest, base: Path | None = None) -> Store | GGUFStore:
    """The store for a copy: a folder of safetensors groups, or one sparse GGUF."""
    return GGUFStore(manifest, base) if manifest.gguf is not None else Store(manifest, base)


def existing_store(manifest_id: str, base: Path | None = None) -> Store | GGUFStore | None:
    """The store of a copy fetched before (some of it, at least), if any."""
    path = store_root(manifest_id, base) / MANIFEST
    try:
        return open_store(Manifest.from_json(path.read_bytes(), manifest_id), base)
    except (OSError, ManifestError):
        return None
