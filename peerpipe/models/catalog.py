"""What models this machine holds: the bundled one, packaged ones, folders and files used before,
Ollama's library and the Hugging Face cache, each with its size and how to name it to --model."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from peerpipe.models.bundled import BUNDLED, PACKAGED, default_model_dir
from peerpipe.models.errors import ModelNotFoundError
from peerpipe.paths import cache_dir

MAX_REMEMBERED = 64


@dataclass(frozen=True)
class Held:
    name: str  # what --model takes
    source: str  # bundled, package, local, ollama or hub
    path: Path
    bytes: int


def _size(path: Path) -> int:
    """Bytes a file, or the files under a folder, take on disk (a symlink counts as what it points
    to; a fetched GGUF is a sparse file that holds only the layers this node serves)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(min(st.st_size, st.st_blocks * 512) for st in (p.stat() for p in files))


def _used_file() -> Path:
    return cache_dir() / "models" / "used.json"


def _used() -> list[str]:
    try:
        data = json.loads(_used_file().read_text())
    except (OSError, ValueError):
        return []
    return [p for p in data if isinstance(p, str)] if isinstance(data, list) else []


def looks_like_model(path: Path) -> bool:
    """A Hugging Face folder (its config.json) or a GGUF file (its magic): what ``remember`` keeps and lists."""
    if path.is_dir():
        return (path / "config.json").is_file()
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def remember(path: Path) -> None:
    """Note a model folder or file a command used, for ``peerpipe models`` (best effort; a path
    that is no model, such as a typo's, is not kept)."""
    if not looks_like_model(path):
        return
    text = str(path.resolve())
    used = [text, *(p for p in _used() if p != text)][:MAX_REMEMBERED]
    try:
        _used_file().parent.mkdir(parents=True, exist_ok=True)
        _used_file().write_text(json.dumps(used, indent=1))
    except OSError:
        pass


def _ollama() -> Iterator[Held]:
    from peerpipe.models.ollama import MODEL_LAYER, ollama_root

    manifests = ollama_root() / "manifests"
    for manifest in sorted(p for p in manifests.rglob("*") if p.is_file()) if manifests.is_dir() else []:
        parts = manifest.relative_to(manifests).parts
        try:
            layers = json.loads(manifest.read_text())["layers"]
            digest = next(x["digest"] for x in layers if x.get("mediaType") == MODEL_LAYER)
        except (OSError, ValueError, KeyError, TypeError, StopIteration):
            continue
        blob = ollama_root() / "blobs" / str(digest).replace(":", "-")
        if len(parts) < 3 or not blob.is_file():
            continue
        if parts[0] != "registry.ollama.ai":  # (pulled from another registry, hf.co say: its name keeps it)
            name = "/".join(parts[:-1])
        else:
            name = "/".join(parts[2:-1]) if parts[1] == "library" else "/".join(parts[1:-1])
        yield Held(f"ollama:{name}:{parts[-1]}", "ollama", blob, blob.stat().st_size)


def _hub_cache() -> Path:
    if explicit := os.environ.get("HF_HUB_CACHE"):
        return Path(explicit)
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def _hub() -> Iterator[Held]:
    root = _hub_cache()
    for repo in sorted(root.glob("models--*")) if root.is_dir() else []:
        name = repo.name.removeprefix("models--").replace("--", "/", 1)
        if any(repo.glob("snapshots/*/*.safetensors")):
            yield Held(name, "hub", repo, _size(repo / "blobs") if (repo / "blobs").is_dir() else _size(repo))


def _fetched() -> Iterator[Held]:
    """Layers fetched from a room's peers (weights/store.py): ``cache_dir()/models/<manifest id>``.
    They are a part of a model (the layers this machine served), so they are named, not loaded whole."""
    root = cache_dir() / "models"
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            model_id = json.loads((folder / "peerpipe-manifest.json").read_text())["model_id"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        yield Held(f"fetched:{model_id}@{folder.name[:12]}", "fetched", folder, _size(folder))


def catalog() -> list[Held]:
    found = [Held(BUNDLED, "bundled", default_model_dir(), _size(default_model_dir()))]
    for name in PACKAGED:
        try:
            from peerpipe.models.bundled import packaged

            path = packaged(name)
        except ModelNotFoundError:
            continue
        if path.is_file():
            found.append(Held(name, "package", path, path.stat().st_size))
    for text in _used():
        path = Path(text)
        if looks_like_model(path) and path != default_model_dir() and all(h.path != path for h in found):
            found.append(Held(text, "local", path, _size(path)))
    found += list(_ollama())
    found += list(_hub())
    found += list(_fetched())
    return found


def remove(name: str) -> Held:
    """Free what ``name`` takes: a Hugging Face cache entry or fetched layers are deleted; a folder or file used
    before is only forgotten (it is the user's); Ollama's and bundled models are left alone."""
    if name.startswith("ollama:") and ":" not in name.removeprefix("ollama:"):
        name += ":latest"  # (as --model reads an Ollama name without a tag)
    held = next((h for h in catalog() if h.name == name), None)
    if held is None:
        raise ModelNotFoundError(f"this machine holds no model {name!r} (see `peerpipe models`)")
    if held.source in ("hub", "fetched"):
        shutil.rmtree(held.path)
    elif held.source == "local":
        _used_file().write_text(json.dumps([p for p in _used() if p != name], indent=1))
    else:
        owner = {"ollama": "managed by Ollama: `ollama rm` removes it", "bundled": "part of peerpipe itself"}
        raise ModelNotFoundError(f"{name} is {owner.get(held.source, 'part of an installed package')}; nothing removed")
    return held
