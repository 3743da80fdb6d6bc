"""The model a room plans for: its config, its planner spec and the shape nodes benchmark."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peerpipe.cluster.benchmark import shape_key
from peerpipe.engine.config import ModelConfig
from peerpipe.engine.errors import ModelLoadError
from peerpipe.plan import ModelSpec
from peerpipe.protocol.messages import MAX_MODEL_SHAPE_LEN

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelChoice:
    config: ModelConfig
    model_id: str
    shape_json: str  # the config.json that nodes build a layer from to time it
    dtype: str  # what the stages will hold the weights in
    path: Path | None = None

    @classmethod
    def from_dir(cls, path: str | Path, dtype: str = "bfloat16") -> ModelChoice:
        path = Path(path)
        config = ModelConfig.from_dir(path)  # validates and explains a bad folder
        if dtype not in DTYPE_BYTES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        shape = json.dumps(raw, separators=(",", ":"))
        if len(shape) > MAX_MODEL_SHAPE_LEN:
            raise ModelLoadError(f"{path}/config.json is larger than {MAX_MODEL_SHAPE_LEN} bytes")
        return cls(config, path.resolve().name, shape, dtype, path)

    @property
    def shape_key(self) -> str:
        return shape_key(self.config)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_config(self.config, self.model_id, DTYPE_BYTES[self.dtype])

    @property
    def half(self) -> bool:
        return DTYPE_BYTES[self.dtype] == 2
