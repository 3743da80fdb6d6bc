"""The model a room plans for: its config, its planner spec and the shape nodes benchmark."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peerpipe.dtypes import ITEMSIZE, WEIGHT_DTYPES
from peerpipe.engine.config import ModelConfig
from peerpipe.engine.errors import ModelLoadError
from peerpipe.plan import ModelSpec
from peerpipe.protocol.messages import MAX_MODEL_SHAPE_LEN


@dataclass(frozen=True)
class ModelChoice:
    config: ModelConfig
    model_id: str
    shape_json: str  # the config.json that nodes build a layer from to time it
    dtype: str  # what the stages will hold the weights in
    path: Path  # the host's copy
    manifest_id: str = ""  # its tensors' hashes (weights/manifest.py): members without it fetch from peers

    @classmethod
    def from_dir(cls, path: str | Path, dtype: str = "bfloat16") -> ModelChoice:
        path = Path(path)
        config = ModelConfig.from_dir(path)  # validates and explains a bad folder
        if dtype not in WEIGHT_DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(WEIGHT_DTYPES)}")
        if path.is_file():  # a GGUF: its metadata as a config.json, named after the file
            from peerpipe.engine.gguf_file import open_gguf

            gguf = open_gguf(str(path))
            raw, model_id = gguf.hf_config, gguf.model_id
        else:
            raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
            model_id = _folder_name(path)
        shape = json.dumps(raw, separators=(",", ":"))
        if len(shape) > MAX_MODEL_SHAPE_LEN:
            raise ModelLoadError(f"{path}/config.json is larger than {MAX_MODEL_SHAPE_LEN} bytes")
        return cls(config, model_id, shape, dtype, path)

    @property
    def shape_key(self) -> str:
        return self.config.shape_key

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_config(self.config, self.model_id, ITEMSIZE[self.dtype])

    @property
    def half(self) -> bool:
        return ITEMSIZE[self.dtype] == 2


def _folder_name(path: Path) -> str:
    """A folder's name; for a Hugging Face cache snapshot (``models--org--name/snapshots/<commit>``,
    named by its commit) the model's name."""
    resolved = path.resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent.name.split("--")[-1]
    return resolved.name
