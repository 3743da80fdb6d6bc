"""Models that ship inside the peerpipe package."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def default_model_dir() -> Path:
    """The folder of the embedded default model, a small Llama trained on Jane Austen's novels.

    It is in the Hugging Face layout, so anything that takes a model folder (``peerpipe generate
    --model``, ``LocalEngine.from_dir``, ``load_stage``) can use it without a download.
    docs/default-model.md describes how it was trained and what it can do.
    """
    return _HERE / "austen"
