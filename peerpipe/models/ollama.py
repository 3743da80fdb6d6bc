"""Ollama's models, read in place: ``NAME[:TAG]`` -> the GGUF blob its manifest names.

Ollama keeps a manifest per model at ``manifests/<registry>/<namespace>/<name>/<tag>`` (JSON
with ``layers``, one of media type ``application/vnd.ollama.image.model``) and the files as
content-addressed blobs at ``blobs/sha256-<hex>``, under ``$OLLAMA_MODELS`` or ``~/.ollama/models``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from peerpipe.models.errors import ModelNotFoundError

MODEL_LAYER = "application/vnd.ollama.image.model"
REGISTRY = "registry.ollama.ai"


class OllamaModelError(ModelNotFoundError):
    """The Ollama model asked for is not on this machine, or its files are not what Ollama writes."""


def ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def resolve_ollama(reference: str) -> Path:
    """``llama3.2``, ``llama3.2:1b``, ``user/model:tag`` or ``host/user/model:tag`` -> its blob."""
    name, _, tag = reference.partition(":")
    tag = tag or "latest"
    parts = [p for p in name.split("/") if p]
    if not parts or not all(re.fullmatch(r"[A-Za-z0-9._-]+", p) and p not in (".", "..") for p in [*parts, tag]):
        raise OllamaModelError(f"{reference!r} is not an Ollama model name (like llama3.2 or llama3.2:1b)")
    if len(parts) == 1:
        parts = ["library", *parts]
    if len(parts) == 2:
        parts = [REGISTRY, *parts]
    root = ollama_root()
    manifest = root / "manifests" / Path(*parts) / tag
    if not manifest.is_file():
        raise OllamaModelError(
            f"Ollama has no model {reference!r} on this machine (looked in {root}): `ollama pull {reference}` would fetch it"
        )
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER)
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise OllamaModelError(f"{manifest} is not an Ollama manifest with a model layer") from None
    if not isinstance(digest, str) or not re.fullmatch(r"sha256[:-][0-9a-f]{64}", digest):
        raise OllamaModelError(f"{manifest} names a blob {digest!r} that is not a sha256 digest")
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise OllamaModelError(f"Ollama's blob {blob.name} for {reference!r} is missing: `ollama pull {reference}` again")
    return blob
