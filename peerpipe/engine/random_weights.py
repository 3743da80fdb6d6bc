"""Random weights made on the device from a seed, for benchmark rooms of shapes no disk holds.

A *random folder* is a model folder with ``config.json``, a tokenizer and ``random-weights.json``
(``{"seed": S}``) but no weight files: a stage of it fills its layers on its own device. Each
tensor is drawn from a generator seeded by the seed and the tensor's name in the whole model, so
the weights are the same however the layers are split over stages (on one kind of device): a room
of a random folder answers exactly as one node does.

The 70B shape needs no 141 GB checkpoint: each GPU draws its 70 GB in seconds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from peerpipe.engine.errors import ModelLoadError

if TYPE_CHECKING:  # torch only where a stage is drawn: weights/ asks is_random without it
    import torch

    from peerpipe.engine.config import ModelConfig
    from peerpipe.engine.model import Stage

MARKER = "random-weights.json"
STD = 0.02  # what Hugging Face initialises matrices with: hidden states stay in range over 80 layers
ProgressFn = Callable[[int, int], None]


def is_random(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MARKER).is_file()


def random_seed(path: str | Path) -> int:
    try:
        seed = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))["seed"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}/{MARKER} must be a JSON object with an integer seed: {exc}") from None
    if type(seed) is not int or not 0 <= seed < 2**63:
        raise ModelLoadError(f"{path}/{MARKER}: seed must be a whole number from 0 to 2**63-1, not {seed!r}")
    return seed


def mark_random(path: str | Path, seed: int = 0) -> None:
    """Make ``path`` (holding config.json and a tokenizer) a random folder."""
    (Path(path) / MARKER).write_text(json.dumps({"seed": seed}) + "\n", encoding="utf-8")


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _global_name(local: str, start: int) -> str:
    """``layers.3.attn…`` of a stage starting at layer 8 is ``layers.11.attn…`` of the model."""
    parts = local.split(".")
    if parts[0] == "layers":
        parts[1] = str(int(parts[1]) + start)
    return ".".join(parts)


def random_stage(
    cfg: ModelConfig,
    start: int,
    end: int,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressFn | None = None,
) -> Stage:
    """Layers ``[start, end)`` with weights drawn on ``device``: matrices N(0, STD²), norms 1,
    biases 0. A tied head is drawn as the embedding is, so a last stage without the embedding
    holds the same matrix."""
    import torch

    from peerpipe.engine.model import Stage

    with torch.device("meta"):
        stage = Stage(cfg, start, end)
    named = list(stage.named_parameters())
    total = sum(p.numel() * dtype.itemsize for _, p in named)
    state: dict[str, torch.Tensor] = {}
    done = 0
    generator = torch.Generator(device=device)
    for local, meta in named:
        name = _global_name(local, start)
        if name == "lm_head.weight" and cfg.tie_embeddings:
            name = "embed.weight"
        tensor = torch.empty(meta.shape, device=device, dtype=dtype)
        if local.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif local.endswith(".bias"):
            tensor.zero_()
        else:
            generator.manual_seed(_name_seed(seed, name))
            tensor.normal_(0.0, STD, generator=generator)
        state[local] = tensor
        done += tensor.numel() * dtype.itemsize
        if progress is not None:
            progress(done, total)
    if cfg.tie_embeddings and stage.is_first and stage.is_last:
        state["lm_head.weight"] = state["embed.weight"]
    stage.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings and stage.is_first and stage.is_last:
        stage.lm_head.weight = stage.embed.weight
    return stage.eval().requires_grad_(False)
