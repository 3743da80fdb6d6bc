"""Records nested inside messages: a node's capabilities, its state in the cluster, measured layer
timings and links, and a distribution plan."""

from __future__ import annotations

from dataclasses import dataclass, field

from peerpipe.protocol.errors import ValidationError
from peerpipe.protocol.tensor import TensorData
from peerpipe.protocol.validate import (
    MAX_NAME_LEN,
    need_bool,
    need_choice,
    need_float,
    need_id,
    need_instance,
    need_int,
    need_str,
    need_tuple_of,
)

MAX_STAGES = 1024
MAX_MEMBERS = 1024
# Layer indices beyond this are nonsense for any model we can hold.
MAX_LAYERS = 1 << 20
# how a stage's hidden states travel on (local: the model's dtype through shared memory)
WIRE_FORMATS = frozenset({"", "bf16", "fp16", "int8", "fp8", "local"})
QUANT_MODES = frozenset({"none", "int8", "int4", "auto"})  # how a node holds its layers' matrices (auto: the plan says)
STAGE_QUANT = frozenset({"", "none", "int8", "int4"})  # what the plan says to an auto node


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node tells the cluster about itself when it joins.

    ``device`` is a short backend name such as ``cpu``, ``cuda``, ``mps`` or ``wgpu``; it is kept open
    so new backends need no protocol change. ``memory_bytes`` is what the node offers the model (free device memory, or free RAM on a CPU);
    ``address`` is where it accepts other nodes (``host:port``), empty if it does not listen.
    """

    node_id: str
    name: str
    device: str
    memory_bytes: int
    tflops: float  # fp32 matmul
    supports_f16: bool = True
    memory_bandwidth_gbps: float = 0.0
    address: str = ""
    device_name: str = ""
    memory_total_bytes: int = 0
    tflops_half: float = 0.0  # fp16/bf16 matmul, 0 when not measured
    latency_ms: float = 0.0  # one tiny kernel, launch to done
    supports_bf16: bool = False
    cpu_cores: int = 0
    ram_bytes: int = 0
    quantize: str = "none"  # how it holds its layers' matrices: none, int8, int4
    machine: str = ""  # its shared memory's name: nodes with the same pass hidden states through it
    shm_gbps: float = 0.0  # device -> shared memory -> device, GB/s as measured (0: not measured)
    gpu: str = ""  # its GPU's id (CUDA's UUID), "" for none: nodes on one GPU take turns on it
    cpus: str = ""  # the cores it may run on, a hex bit mask ("" unknown): CPU nodes whose cores overlap take turns

    def __post_init__(self) -> None:
        need_id(self, "node_id")
        need_str(self, "machine", 64)
        need_str(self, "gpu", 64)
        need_str(self, "cpus", 64)
        need_float(self, "shm_gbps")
        need_str(self, "name", MAX_NAME_LEN)
        need_choice(self, "quantize", QUANT_MODES)
        need_id(self, "device")
        need_int(self, "memory_bytes")
        need_float(self, "tflops")
        need_bool(self, "supports_f16")
        need_float(self, "memory_bandwidth_gbps")
        need_str(self, "address", MAX_NAME_LEN)
        need_str(self, "device_name", MAX_NAME_LEN)
        need_int(self, "memory_total_bytes")
        need_float(self, "tflops_half")
        need_float(self, "latency_ms")
        need_bool(self, "supports_bf16")
        need_int(self, "cpu_cores", 0, 1 << 20)
        need_int(self, "ram_bytes")


@dataclass(frozen=True, slots=True)
class LayerTiming:
    """One decoder layer of the model shape ``shape_key``, timed on a node in ``dtype``:
    ``decode_ms`` for one token, ``prefill_ms`` for ``prefill_tokens`` tokens at once.
    ``stage_overhead_ms`` is what a decode step costs a stage besides its layers (masks, positions)."""

    shape_key: str
    dtype: str
    decode_ms: float
    prefill_ms: float
    prefill_tokens: int
    layer_bytes: int
    stage_overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        need_id(self, "shape_key")
        need_id(self, "dtype")
        need_float(self, "decode_ms")
        need_float(self, "prefill_ms")
        need_int(self, "prefill_tokens", 1, 1 << 20)
        need_int(self, "layer_bytes")
        need_float(self, "stage_overhead_ms")


@dataclass(frozen=True, slots=True)
class LinkStat:
    """The network path from ``src`` to ``dst`` as ``src`` measured it."""

    src: str
    dst: str
    rtt_ms: float
    mib_per_s: float

    def __post_init__(self) -> None:
        need_id(self, "src")
        need_id(self, "dst")
        need_float(self, "rtt_ms")
        need_float(self, "mib_per_s")


HEALTH = frozenset({"alive", "suspected"})


@dataclass(frozen=True, slots=True)
class MemberState:
    """A member as the host sees it: what it is, whether it is alive, how busy, how fast."""

    info: NodeInfo
    health: str = "alive"
    status: str = "idle"
    load: float = 0.0
    heartbeat_age_ms: float = 0.0
    timing: LayerTiming | None = None
    steps: int = 0  # forwards its stage has run
    compute_s: float = 0.0  # seconds those forwards took

    def __post_init__(self) -> None:
        need_instance(self, "info", NodeInfo)
        need_choice(self, "health", HEALTH)
        need_id(self, "status")
        need_float(self, "load", 0.0, 1.0)
        need_float(self, "heartbeat_age_ms")
        need_instance(self, "timing", LayerTiming, optional=True)
        need_int(self, "steps")
        need_float(self, "compute_s")


@dataclass(frozen=True, slots=True)
class Sampling:
    """How an answer picks its tokens and when it stops: the one sampling record, from a client's
    generate-request to the last stage. ``None`` means the model's default (generation_config.json,
    else greedy; ``max_tokens``: the rest of the context); the host fills every default in before a
    session's first compute request."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            if getattr(self, name) is not None:
                need_float(self, name)
        if self.top_k is not None:
            need_int(self, "top_k", 0, 1 << 31)
        need_float(self, "min_p", 0.0, 1.0)
        need_float(self, "repetition_penalty")
        if self.seed is not None:
            need_int(self, "seed")
        if self.max_tokens is not None:
            need_int(self, "max_tokens", 1, 1 << 20)
        need_tuple_of(self, "stop", str, 16)
        need_bool(self, "ignore_eos")


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """How the last stage samples a new session's tokens; rides on its first compute request.

    ``history`` holds the prompt's token ids (int64) when a repetition penalty needs them."""

    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0))
    history: TensorData | None = None

    def __post_init__(self) -> None:
        need_instance(self, "sampling", Sampling)
        need_instance(self, "history", TensorData, optional=True)


TASK_STATUSES = frozenset({"queued", "prefill", "decoding", "recovering", "done", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A request the host is running (or just ran)."""

    task_id: str
    status: str
    prompt_tokens: int
    tokens: int
    tok_s: float
    error: str = ""

    def __post_init__(self) -> None:
        need_id(self, "task_id")
        need_choice(self, "status", TASK_STATUSES)
        need_int(self, "prompt_tokens")
        need_int(self, "tokens")
        need_float(self, "tok_s")
        need_str(self, "error")


@dataclass(frozen=True, slots=True)
class PlanStage:
    """One pipeline stage: ``node_id`` runs layers ``[start, end)``; the planner predicted
    ``predicted_ms`` per decode step for it (0: not predicted, as for a promoted standby)."""

    node_id: str
    start: int
    end: int
    predicted_ms: float = 0.0
    wire: str = ""  # how its hidden states travel to the next stage: "" (the model's dtype), bf16, fp16, int8, fp8
    quantize: str = ""  # for a node that let the planner choose: how it holds these layers ("": as it said)

    def __post_init__(self) -> None:
        need_id(self, "node_id")
        need_int(self, "start", 0, MAX_LAYERS)
        need_int(self, "end", 1, MAX_LAYERS)
        need_float(self, "predicted_ms")
        need_choice(self, "wire", WIRE_FORMATS)
        need_choice(self, "quantize", STAGE_QUANT)
        if self.start >= self.end:
            raise ValidationError(f"PlanStage layer range [{self.start}, {self.end}) is empty")


@dataclass(frozen=True, slots=True)
class Plan:
    """A distribution plan: ordered stages that cover layers ``[0, num_layers)`` without gaps."""

    version: int
    model_id: str
    num_layers: int
    stages: tuple[PlanStage, ...]
    predicted_ms: float = 0.0
    standbys: tuple[PlanStage, ...] = ()  # second copies of stages' ranges, for failover
    # How many stages can compute at once (0: all): stages on one GPU take turns, so a batch cut
    # into more micro-batches than this only runs more forwards (docs/inference.md).
    lanes: int = 0

    def __post_init__(self) -> None:
        need_int(self, "version")
        need_int(self, "lanes", 0, MAX_STAGES)
        need_str(self, "model_id", MAX_NAME_LEN)
        if not self.model_id:
            raise ValidationError("Plan.model_id must not be empty")
        need_int(self, "num_layers", 1, MAX_LAYERS)
        need_tuple_of(self, "stages", PlanStage, MAX_STAGES)
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
        need_tuple_of(self, "standbys", PlanStage, MAX_STAGES)
        held = {(s.start, s.end): s.node_id for s in self.stages}
        for spare in self.standbys:
            owner = held.get((spare.start, spare.end))
            if owner is None:
                raise ValidationError(f"Plan.standbys: [{spare.start}, {spare.end}) is no stage's range")
            if owner == spare.node_id:
                raise ValidationError(f"Plan.standbys: {spare.node_id} already holds [{spare.start}, {spare.end})")
