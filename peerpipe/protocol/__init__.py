"""peerpipe's wire protocol: typed messages, the binary codec, and chunking (sans-IO, no torch).

See docs/protocol.md for the wire format.
"""

from peerpipe.protocol.chunking import Reassembler, is_bulk, split
from peerpipe.protocol.codec import decode, encode, tensor_fields
from peerpipe.protocol.errors import (
    ChecksumError,
    ChunkError,
    DecodeError,
    ProtocolError,
    ValidationError,
    VersionMismatchError,
)
from peerpipe.protocol.limits import DEFAULT_LIMITS, Limits
from peerpipe.protocol.messages import (
    BY_TAG,
    HEARTBEAT_STATUSES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    BenchmarkRequest,
    BenchmarkResult,
    Bye,
    Cancel,
    ComputeError,
    ComputeRequest,
    ComputeResult,
    DistributionPlan,
    Heartbeat,
    Hello,
    JoinCluster,
    LeaveCluster,
    Message,
    Ping,
    PlanAck,
    Pong,
    RoomView,
    TensorChunk,
    check_hello,
)
from peerpipe.protocol.records import NodeInfo, Plan, Stage
from peerpipe.protocol.tensor import DTYPES, ENCODINGS, TensorData

__all__ = [
    "BY_TAG",
    "DEFAULT_LIMITS",
    "DTYPES",
    "ENCODINGS",
    "HEARTBEAT_STATUSES",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "BenchmarkRequest",
    "BenchmarkResult",
    "Bye",
    "Cancel",
    "ChecksumError",
    "ChunkError",
    "ComputeError",
    "ComputeRequest",
    "ComputeResult",
    "DecodeError",
    "DistributionPlan",
    "Heartbeat",
    "Hello",
    "JoinCluster",
    "LeaveCluster",
    "Limits",
    "Message",
    "NodeInfo",
    "Ping",
    "Plan",
    "PlanAck",
    "Pong",
    "ProtocolError",
    "Reassembler",
    "RoomView",
    "Stage",
    "TensorChunk",
    "TensorData",
    "ValidationError",
    "VersionMismatchError",
    "check_hello",
    "decode",
    "encode",
    "is_bulk",
    "split",
    "tensor_fields",
]
