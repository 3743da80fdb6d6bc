"""A model's sampling defaults (generation_config.json), read once, and how a request's fields
fall back to them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from peerpipe.engine.sampling import SamplingParams


class SamplingRequest(Protocol):
    """What a caller asks for; ``None`` means "the model's default"."""

    @property
    def temperature(self) -> float | None: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def min_p(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def stop(self) -> tuple[str, ...] | list[str]: ...
    @property
    def ignore_eos(self) -> bool: ...


@dataclass(frozen=True)
class GenerationDefaults:
    """The model's own choices; greedy when it makes none."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_dir(cls, model_dir: Path | None) -> GenerationDefaults:
        path = model_dir / "generation_config.json" if model_dir else None
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        return cls(
            temperature=float(data.get("temperature", 1.0)) if data.get("do_sample") else 0.0,
            top_k=int(data.get("top_k", 0) or 0),
            top_p=float(data.get("top_p", 1.0) or 1.0),
        )

    def resolve(self, request: SamplingRequest, max_tokens: int) -> SamplingParams:
        """The request's values first, then these defaults."""
        return SamplingParams(
            temperature=self.temperature if request.temperature is None else request.temperature,
            top_k=self.top_k if request.top_k is None else request.top_k,
            top_p=self.top_p if request.top_p is None else request.top_p,
            min_p=request.min_p,
            repetition_penalty=request.repetition_penalty,
            seed=request.seed,
            max_tokens=max_tokens,
            stop=tuple(request.stop),
            ignore_eos=request.ignore_eos,
        )
