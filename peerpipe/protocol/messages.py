"""The closed set of messages peers exchange. Each class has a wire ``TAG``; see docs/protocol.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

from peerpipe.protocol.answers import GenerateDone, GenerateRequest, GenerateText
from peerpipe.protocol.errors import ValidationError, VersionMismatchError
from peerpipe.protocol.records import (
    MAX_LAYERS,
    MAX_MEMBERS,
    LayerTiming,
    LinkStat,
    MemberState,
    NodeInfo,
    Plan,
    SessionSpec,
    TaskInfo,
)
from peerpipe.protocol.tensor import TensorData, as_byte_view, chunk_span
from peerpipe.protocol.validate import (
    MAX_NAME_LEN,
    need_bool,
    need_choice,
    need_float,
    need_id,
    need_instance,
    need_int,
    need_ranks,
    need_str,
    need_tuple_of,
)
from peerpipe.protocol.weights import ManifestReply, ManifestRequest, WeightReply, WeightRequest

PROTOCOL_VERSION = 11
MAX_FEATURES = 64
MAX_DRAFT = 64  # drafted tokens one compute-request may carry for verification
MAX_BATCH = 1024  # steps one compute-batch may carry
MAX_MODEL_SHAPE_LEN = 16384
HEARTBEAT_STATUSES = frozenset({"idle", "busy", "loading", "draining", "error"})


def _need_features(obj: Hello) -> None:
    need_tuple_of(obj, "features", str, MAX_FEATURES)
    for feature in obj.features:
        if not feature or len(feature) > MAX_NAME_LEN:
            raise ValidationError(f"Hello.features has an invalid entry {feature!r}")


@dataclass(frozen=True, slots=True)
class Hello:
    """First message on every connection. Its fields never change across versions, so any two
    versions can read each other's hello and report a mismatch; new abilities go in ``features``."""

    TAG: ClassVar[str] = "hello"
    protocol_version: int
    node_id: str
    name: str
    software: str = ""
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        need_int(self, "protocol_version", 1, 0xFFFF)
        need_id(self, "node_id")
        need_str(self, "name", MAX_NAME_LEN)
        need_str(self, "software", MAX_NAME_LEN)
        _need_features(self)


@dataclass(frozen=True, slots=True)
class Ping:
    """Answered at once by a ``Pong`` with the same nonce; ``payload`` (ignored) lets a node time
    a transfer of known size and so measure the link's bandwidth."""

    TAG: ClassVar[str] = "ping"
    nonce: int
    payload: bytes | memoryview = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        need_int(self, "nonce")
        if not isinstance(self.payload, (bytes, bytearray, memoryview)):
            raise ValidationError(f"Ping.payload must be bytes, got {type(self.payload).__name__}")
        object.__setattr__(self, "payload", as_byte_view(self.payload))


@dataclass(frozen=True, slots=True)
class Pong:
    TAG: ClassVar[str] = "pong"
    nonce: int

    def __post_init__(self) -> None:
        need_int(self, "nonce")


@dataclass(frozen=True, slots=True)
class Bye:
    """Last message before an orderly close; ``reason`` is shown to the user on the other side."""

    TAG: ClassVar[str] = "bye"
    reason: str = ""

    def __post_init__(self) -> None:
        need_str(self, "reason")


@dataclass(frozen=True, slots=True)
class JoinCluster:
    TAG: ClassVar[str] = "join-cluster"
    node_info: NodeInfo

    def __post_init__(self) -> None:
        need_instance(self, "node_info", NodeInfo)


@dataclass(frozen=True, slots=True)
class LeaveCluster:
    TAG: ClassVar[str] = "leave-cluster"
    peer_id: str

    def __post_init__(self) -> None:
        need_id(self, "peer_id")


@dataclass(frozen=True, slots=True)
class NewCode:
    """The host gave the room a fresh code (someone was guessing the old one): members accept
    and dial new connections with it from now on. Sent only on authenticated channels."""

    TAG: ClassVar[str] = "new-code"
    code: str

    def __post_init__(self) -> None:
        need_str(self, "code", MAX_NAME_LEN)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Periodic liveness and load report; ``load`` is the busy fraction in ``[0, 1]``.

    ``steps`` and ``compute_s`` count the decode forwards (one new position per answer, a batch
    counting once) this node's stage has run and the seconds they took, since it started: the
    host shows them next to the plan's prediction and exports them as each stage's latency."""

    TAG: ClassVar[str] = "heartbeat"
    load: float
    status: str
    steps: int = 0
    compute_s: float = 0.0

    def __post_init__(self) -> None:
        need_float(self, "load", 0.0, 1.0)
        need_choice(self, "status", HEARTBEAT_STATUSES)
        need_int(self, "steps")
        need_float(self, "compute_s")


@dataclass(frozen=True, slots=True)
class RoomView:
    """The host's view of the cluster; ``epoch`` grows with every membership or health change,
    so stale views are ignored. ``plan`` is the current plan, ``acked`` the nodes that loaded it."""

    TAG: ClassVar[str] = "room-view"
    epoch: int
    members: tuple[MemberState, ...]
    plan: Plan | None = None
    acked: tuple[str, ...] = ()
    links: tuple[LinkStat, ...] = ()
    heartbeat_s: float = 1.0  # how often members must beat
    tasks: tuple[TaskInfo, ...] = ()  # requests in flight on the host
    measured_ms: float = 0.0  # ms per token of the room's last answers, as decoded (0: none yet)

    def __post_init__(self) -> None:
        need_int(self, "epoch")
        need_float(self, "heartbeat_s", 0.01, 3600.0)
        need_float(self, "measured_ms")
        need_tuple_of(self, "tasks", TaskInfo, MAX_MEMBERS)
        need_tuple_of(self, "members", MemberState, MAX_MEMBERS)
        ids = [member.info.node_id for member in self.members]
        if len(set(ids)) != len(ids):
            raise ValidationError("RoomView.members lists a node_id twice")
        need_instance(self, "plan", Plan, optional=True)
        need_tuple_of(self, "acked", str, MAX_MEMBERS)
        need_tuple_of(self, "links", LinkStat, MAX_MEMBERS * 4)


@dataclass(frozen=True, slots=True)
class DistributionPlan:
    """A plan for every node; a stage loads its range of the model ``shape_key`` in ``dtype``
    with a KV cache of ``sessions`` x ``context_tokens``. ``manifest_id`` names the host's copy
    (its tensors' hashes): a node without it fetches its layers from peers ("": a GGUF file)."""

    TAG: ClassVar[str] = "distribution-plan"
    plan: Plan
    shape_key: str = ""
    dtype: str = ""
    context_tokens: int = 0
    sessions: int = 0
    manifest_id: str = ""
    prefetch: bool = False  # only fetch the layers this plan gives you (the current plan still serves), then ack

    def __post_init__(self) -> None:
        need_instance(self, "plan", Plan)
        need_str(self, "shape_key", MAX_NAME_LEN)
        need_str(self, "dtype", MAX_NAME_LEN)
        need_int(self, "context_tokens", 0, 1 << 32)
        need_int(self, "sessions", 0, 1 << 20)
        need_str(self, "manifest_id", MAX_NAME_LEN)
        need_bool(self, "prefetch")


@dataclass(frozen=True, slots=True)
class PlanAck:
    """A node has loaded its stage of plan ``version`` (``ok``) or could not (``error`` says why)."""

    TAG: ClassVar[str] = "plan-ack"
    version: int
    ok: bool = True
    error: str = ""
    prefetched: bool = False  # the answer to a prefetch: the layers are on disk, not loaded

    def __post_init__(self) -> None:
        need_int(self, "version")
        need_bool(self, "ok")
        need_str(self, "error")
        need_bool(self, "prefetched")


@dataclass(frozen=True, slots=True)
class BenchmarkRequest:
    """Measure this node: its device, and when ``model_shape`` (the model's ``config.json``) is
    given one of its layers in ``dtype``, and the links to the nodes in ``links_to``."""

    TAG: ClassVar[str] = "benchmark-request"
    request_id: int = 0
    model_shape: str = ""
    dtype: str = ""
    links_to: tuple[str, ...] = ()
    fresh: bool = False  # measure the layer again instead of reading the node's cache
    manifest_id: str = ""  # the room's copy of the model: say which of its layers this node holds

    def __post_init__(self) -> None:
        need_int(self, "request_id")
        need_str(self, "model_shape", MAX_MODEL_SHAPE_LEN)
        need_str(self, "dtype", MAX_NAME_LEN)
        need_tuple_of(self, "links_to", str, MAX_MEMBERS)
        need_bool(self, "fresh")
        need_str(self, "manifest_id", MAX_NAME_LEN)


@dataclass(frozen=True, slots=True)
class BenchmarkResult:
    """``score`` is the relative performance the proportional strategy uses; the rest are the
    raw measurements. ``error`` says why a requested part could not be measured."""

    TAG: ClassVar[str] = "benchmark-result"
    score: float
    request_id: int = 0
    matmul_tflops: float = 0.0
    memory_bandwidth_gbps: float = 0.0
    latency_ms: float = 0.0
    timing: LayerTiming | None = None
    links: tuple[LinkStat, ...] = ()
    error: str = ""
    held_layers: tuple[int, ...] = ()  # layers of the asked manifest this node holds verified copies of

    def __post_init__(self) -> None:
        need_float(self, "score")
        need_int(self, "request_id")
        need_float(self, "matmul_tflops")
        need_float(self, "memory_bandwidth_gbps")
        need_float(self, "latency_ms")
        need_instance(self, "timing", LayerTiming, optional=True)
        need_tuple_of(self, "links", LinkStat, MAX_MEMBERS)
        need_str(self, "error")
        need_tuple_of(self, "held_layers", int, MAX_LAYERS)


@dataclass(frozen=True, slots=True)
class ComputeRequest:
    """Run this node's stage of plan ``plan_version`` on ``input_tensor`` for ``session_id``,
    whose new positions start at ``start_pos``."""

    TAG: ClassVar[str] = "compute-request"
    task_id: str
    input_tensor: TensorData
    session_id: str = ""
    plan_version: int = 0
    start_pos: int = 0
    session: SessionSpec | None = None  # on a session's first request: how to sample it
    layer: int = 0  # the first layer of the stage it is for (a node may hold several)
    drafts: tuple[int, ...] = ()  # the last new positions are these drafted tokens: the last stage verifies them
    partial: bool = False  # a chunk of a prompt that goes on: fill the KV cache, the last stage answers nothing

    def __post_init__(self) -> None:
        need_id(self, "task_id")
        need_instance(self, "input_tensor", TensorData)
        need_ranks(self, "input_tensor", (2, 3))  # token ids [B, n], or hidden states [B, n, H]
        need_str(self, "session_id", MAX_NAME_LEN)
        need_int(self, "plan_version")
        need_int(self, "start_pos", 0, 1 << 40)
        need_instance(self, "session", SessionSpec, optional=True)
        need_int(self, "layer", 0, MAX_LAYERS)
        need_tuple_of(self, "drafts", int, MAX_DRAFT)
        need_bool(self, "partial")


@dataclass(frozen=True, slots=True)
class ComputeResult:
    """The last stage's answer to the step of ``task_id`` that was sent with ``plan_version`` and
    ``start_pos`` (echoed, so a late answer to a step the host gave up on is told apart)."""

    TAG: ClassVar[str] = "compute-result"
    task_id: str
    output_tensor: TensorData
    plan_version: int = 0
    start_pos: int = 0
    ahead: TensorData | None = None  # sent before computed: the first stage's copy (docs/inference.md, "Tokens ahead")

    def __post_init__(self) -> None:
        need_id(self, "task_id")
        need_instance(self, "output_tensor", TensorData)
        need_int(self, "plan_version")
        need_int(self, "start_pos", 0, 1 << 40)
        need_instance(self, "ahead", TensorData, optional=True)


@dataclass(frozen=True, slots=True)
class ComputeBatch:
    """Several steps for one node at once: the requests (to a next stage) or results (to the host)
    one batched forward made. Each is handled as if it had come alone, in order; one frame, one
    decryption and one dispatch carry them all."""

    TAG: ClassVar[str] = "compute-batch"
    requests: tuple[ComputeRequest, ...] = ()
    results: tuple[ComputeResult, ...] = ()

    def __post_init__(self) -> None:
        need_tuple_of(self, "requests", ComputeRequest, MAX_BATCH)
        need_tuple_of(self, "results", ComputeResult, MAX_BATCH)
        if not self.requests and not self.results:
            raise ValidationError("ComputeBatch carries no step")


@dataclass(frozen=True, slots=True)
class ComputeError:
    """A stage could not run the step of ``task_id`` sent with ``plan_version`` and ``start_pos``."""

    TAG: ClassVar[str] = "compute-error"
    task_id: str
    error: str
    plan_version: int = 0
    start_pos: int = 0

    def __post_init__(self) -> None:
        need_id(self, "task_id")
        need_str(self, "error")
        need_int(self, "plan_version")
        need_int(self, "start_pos", 0, 1 << 40)


@dataclass(frozen=True, slots=True)
class Cancel:
    TAG: ClassVar[str] = "cancel"
    task_id: str

    def __post_init__(self) -> None:
        need_id(self, "task_id")


@dataclass(frozen=True, slots=True)
class TensorChunk:
    """Part ``chunk_index`` of ``total_chunks`` of the data of tensor ``tensor_id``."""

    TAG: ClassVar[str] = "tensor-chunk"
    tensor_id: str
    chunk_index: int
    total_chunks: int
    total_bytes: int
    data: bytes | memoryview = field(repr=False)

    def __post_init__(self) -> None:
        need_id(self, "tensor_id")
        need_int(self, "total_chunks", 1, 1 << 32)
        need_int(self, "chunk_index", 0, self.total_chunks - 1)
        need_int(self, "total_bytes", 1, 1 << 48)
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise ValidationError(f"TensorChunk.data must be bytes or memoryview, got {self.data!r}")
        object.__setattr__(self, "data", as_byte_view(self.data))
        size = -(-self.total_bytes // self.total_chunks)
        if (self.total_chunks - 1) * size >= self.total_bytes:
            raise ValidationError(
                f"TensorChunk: {self.total_bytes} bytes cannot be cut into {self.total_chunks} chunks"
            )
        start, end = chunk_span(self.chunk_index, self.total_chunks, self.total_bytes)
        if len(self.data) != end - start:
            raise ValidationError(
                f"TensorChunk {self.chunk_index}/{self.total_chunks} of {self.total_bytes} bytes must "
                f"carry {end - start} bytes, got {len(self.data)}"
            )


Message: TypeAlias = (
    Hello
    | Ping
    | Pong
    | Bye
    | JoinCluster
    | LeaveCluster
    | NewCode
    | Heartbeat
    | RoomView
    | DistributionPlan
    | PlanAck
    | BenchmarkRequest
    | BenchmarkResult
    | ComputeRequest
    | ComputeResult
    | ComputeBatch
    | ComputeError
    | Cancel
    | TensorChunk
    | GenerateRequest
    | GenerateText
    | GenerateDone
    | ManifestRequest
    | ManifestReply
    | WeightRequest
    | WeightReply
)
MESSAGE_TYPES: tuple[type[Message], ...] = Message.__args__
BY_TAG: dict[str, type[Message]] = {cls.TAG: cls for cls in MESSAGE_TYPES}


def check_hello(hello: Hello, local_version: int = PROTOCOL_VERSION) -> None:
    """Raise ``VersionMismatchError`` unless the peer's hello speaks ``local_version``."""
    if hello.protocol_version != local_version:
        raise VersionMismatchError(
            f"peer {hello.name or hello.node_id!r} speaks protocol version {hello.protocol_version}, "
            f"this node speaks {local_version}; install the same peerpipe version on both",
            local=local_version,
            remote=hello.protocol_version,
        )
