"""Models that ship inside the peerpipe package, and the one way a user's ``--model`` becomes a folder."""

from __future__ import annotations

from pathlib import Path

from peerpipe.errors import PeerpipeError

_HERE = Path(__file__).resolve().parent
BUNDLED = "austen"  # the bundled model's name: its folder's, and its id on the API


class ModelNotFoundError(PeerpipeError):
    """``--model`` names neither a folder nor a model peerpipe knows."""


def default_model_dir() -> Path:
    """The folder of the embedded default model, a small Llama trained on Jane Austen's novels.

    It is in the Hugging Face layout, so anything that takes a model folder (``peerpipe generate
    --model``, ``LocalEngine.from_dir``, ``load_stage``) can use it without a download.
    docs/default-model.md describes how it was trained and what it can do.
    """
    return _HERE / BUNDLED


def resolve_model(text: str | Path) -> Path:
    """A model folder from what a user typed: a path, or the bundled model's name.

    A folder of that name in the working directory wins over the bundled model, as a user who
    made one would expect."""
    path = Path(text).expanduser()
    if path.exists():
        return path
    if str(text) == BUNDLED:
        return default_model_dir()
    raise ModelNotFoundError(
        f"no model folder {str(text)!r}: give a Hugging Face model folder (config.json, *.safetensors, "
        f"tokenizer.json), or {BUNDLED!r} for the bundled model"
    )
