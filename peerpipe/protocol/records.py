"""Records nested inside messages: a node's capabilities and a distribution plan."""

from __future__ import annotations

from dataclasses import dataclass

from peerpipe.protocol.errors import ValidationError
from peerpipe.protocol.validate import (
    MAX_NAME_LEN,
    need_bool,
    need_float,
    need_id,
    need_int,
    need_str,
    need_tuple_of,
)

MAX_STAGES = 1024
MAX_MEMBERS = 1024
# Layer indices beyond this are nonsense for any model we can hold.
MAX_LAYERS = 1 << 20


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node tells the cluster about itself when it joins.

    ``device`` is a short backend name such as ``cpu``, ``cuda``, ``mps`` or ``wgpu``; it is kept open
    so new backends need no protocol change.
    """

    node_id: str
    name: str
    device: str
    memory_bytes: int
    tflops: float
    supports_f16: bool = True
    memory_bandwidth_gbps: float = 0.0

    def __post_init__(self) -> None:
        need_id(self, "node_id")
        need_str(self, "name", MAX_NAME_LEN)
        need_id(self, "device")
        need_int(self, "memory_bytes")
        need_float(self, "tflops")
        need_bool(self, "supports_f16")
        need_float(self, "memory_bandwidth_gbps")


@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage: ``node_id`` runs layers ``[start, end)``."""

    node_id: str
    start: int
    end: int

    def __post_init__(self) -> None:
        need_id(self, "node_id")
        need_int(self, "start", 0, MAX_LAYERS)
        need_int(self, "end", 1, MAX_LAYERS)
        if self.start >= self.end:
            raise ValidationError(f"Stage layer range [{self.start}, {self.end}) is empty")


@dataclass(frozen=True, slots=True)
class Plan:
    """A distribution plan: ordered stages that cover layers ``[0, num_layers)`` without gaps."""

    version: int
    model_id: str
    num_layers: int
    stages: tuple[Stage, ...]
    predicted_ms: float = 0.0

    def __post_init__(self) -> None:
        need_int(self, "version")
        need_str(self, "model_id", MAX_NAME_LEN)
        if not self.model_id:
            raise ValidationError("Plan.model_id must not be empty")
        need_int(self, "num_layers", 1, MAX_LAYERS)
        need_tuple_of(self, "stages", Stage, MAX_STAGES)
        need_float(self, "predicted_ms")
        if not self.stages:
            raise ValidationError("Plan.stages must not be empty")
        cursor = 0
        for stage in self.stages:
            if stage.start != cursor:
                raise ValidationError(f"Plan.stages leave a gap or overlap at layer {cursor}")
            cursor = stage.end
        if cursor != self.num_layers:
            raise ValidationError(f"Plan.stages end at layer {cursor}, model has {self.num_layers}")
