"""Sampling parameters from a request's fields, falling back to the model's generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from peerpipe.engine.sampling import SamplingParams


class SamplingRequest(Protocol):
    """What a caller asks for; ``None`` means "the model's default"."""

    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float
    repetition_penalty: float
    seed: int | None
    max_tokens: int
    stop: list[str] | tuple[str, ...]
    ignore_eos: bool


def sampling_params(request: SamplingRequest, model_dir: Path | None = None) -> SamplingParams:
    """The request's values first, then the model's generation_config.json, then greedy."""
    defaults = generation_defaults(model_dir) if model_dir else {}
    temperature = request.temperature
    if temperature is None:
        temperature = float(defaults.get("temperature", 1.0)) if defaults.get("do_sample") else 0.0
    return SamplingParams(
        temperature=temperature,
        top_k=request.top_k if request.top_k is not None else int(defaults.get("top_k", 0) or 0),
        top_p=request.top_p if request.top_p is not None else float(defaults.get("top_p", 1.0) or 1.0),
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
        max_tokens=request.max_tokens,
        stop=tuple(request.stop),
        ignore_eos=request.ignore_eos,
    )


def generation_defaults(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
