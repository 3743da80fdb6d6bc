"""The planner's inputs: what the model needs, what each node offers, how nodes are linked.

All of it is plain, frozen data, so the planner stays a pure function of it. Times are in
milliseconds, sizes in bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peerpipe.engine.config import ModelConfig

GB = 1e9
# A decode step of one layer launches about this many kernels (norms, fused q/k/v, RoPE, attention,
# output, fused gate/up, activation, down, residuals); each costs the device's launch latency.
KERNELS_PER_LAYER = 12
# ...and a stage's step this many more (mask, positions, RoPE gather).
STAGE_KERNELS = 6
# Bytes of framing and encryption around one hidden-state message.
MESSAGE_OVERHEAD_BYTES = 200
TOKEN_MESSAGE_BYTES = 100
PREFILL_TOKENS = 128  # the prompt a plan's predicted time to first token is for


class Objective(StrEnum):
    LATENCY = "latency"  # ms per token of one answer
    THROUGHPUT = "throughput"  # tokens/s of a full pipeline (many concurrent answers)


@dataclass(frozen=True)
class ModelSpec:
    """What a model asks of the nodes that hold it."""

    model_id: str
    num_layers: int
    layer_bytes: int
    embed_bytes: int  # the token embedding, held by the first stage
    head_bytes: int  # final norm + LM head, held by the last stage (tied: the embedding again)
    kv_bytes_per_token: int  # per layer, keys and values
    hidden_bytes: int  # one token's hidden state on the wire
    layer_flops: int  # per token
    tied_embeddings: bool = False
    dtype_bytes: int = 2  # of the weights and the hidden states in the model's own dtype
    max_positions: int = 0  # the model's context (0: unknown); no stage caches more per session

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"a model needs at least one layer, got {self.num_layers}")
        for name in ("layer_bytes", "embed_bytes", "head_bytes", "kv_bytes_per_token", "hidden_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelSpec.{name} must not be negative")

    @property
    def total_weight_bytes(self) -> int:
        shared = self.embed_bytes if self.tied_embeddings else 0
        return self.num_layers * self.layer_bytes + self.embed_bytes + self.head_bytes - shared

    @classmethod
    def from_config(cls, cfg: ModelConfig, model_id: str, dtype_bytes: int = 2) -> ModelSpec:
        """The spec of a model held in a ``dtype_bytes``-wide dtype (2: bf16/fp16, 4: fp32)."""
        embed = cfg.vocab_size * cfg.hidden_size * dtype_bytes
        layer_params = cfg.layer_param_count()
        return cls(
            model_id=model_id,
            num_layers=cfg.n_layers,
            layer_bytes=layer_params * dtype_bytes,
            embed_bytes=embed,
            head_bytes=embed + cfg.hidden_size * dtype_bytes,
            kv_bytes_per_token=2 * cfg.kv_size * dtype_bytes,
            hidden_bytes=cfg.hidden_size * dtype_bytes,
            layer_flops=2 * layer_params,
            tied_embeddings=cfg.tie_embeddings,
            dtype_bytes=dtype_bytes,
            max_positions=cfg.max_positions,
        )


# Bytes one weight value takes when a node quantizes its layers (engine/quant.py), scales and
# zero points included: int8 has a scale per output channel, int4 a float16 scale and zero point
# per group of 64 inputs.
QUANT_BYTES_PER_VALUE = {"int8": 1.0 + 2 / 1024, "int4": 0.5 + 4 / 64}


def layer_scale(quantize: str, dtype_bytes: int) -> float:
    """A node's layer bytes against the model's dtype when it holds them in ``quantize``."""
    return min(1.0, QUANT_BYTES_PER_VALUE[quantize] / dtype_bytes) if quantize != "none" else 1.0


@dataclass(frozen=True)
class NodeSpec:
    """One node as the planner sees it: memory it offers and how fast it runs one layer.

    ``decode_layer_ms`` is one layer's time for one token; ``prefill_layer_ms`` for
    ``prefill_tokens`` tokens at once; ``head_ms`` the final norm and LM head for one token.
    ``stage_ms`` is what one decode step costs a stage on this node besides its layers (building
    masks and positions). ``score`` is the seed's relative performance, used only by the
    proportional strategy.
    """

    node_id: str
    memory_bytes: int
    decode_layer_ms: float
    head_ms: float
    prefill_layer_ms: float = 0.0
    prefill_tokens: int = 128
    score: float = 0.0
    stage_ms: float = 0.0
    layer_scale: float = 1.0  # its layers' bytes against the model's dtype (0.5: int8 weights of a bf16 model)

    def __post_init__(self) -> None:
        if not 0 < self.layer_scale <= 1:
            raise ValueError(f"node {self.node_id}: layer_scale must be in (0, 1], got {self.layer_scale}")
        if self.memory_bytes < 0:
            raise ValueError(f"node {self.node_id}: memory must not be negative")
        for name in ("decode_layer_ms", "head_ms", "prefill_layer_ms", "score", "stage_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"node {self.node_id}: {name} must be a finite number >= 0, got {value}")
        if self.decode_layer_ms <= 0:
            raise ValueError(f"node {self.node_id}: decode_layer_ms must be positive")

    @classmethod
    def estimated(
        cls,
        node_id: str,
        model: ModelSpec,
        *,
        memory_bytes: int,
        tflops: float,
        memory_gbps: float,
        launch_ms: float = 0.01,
        prefill_tokens: int = 128,
    ) -> NodeSpec:
        """A node known only by its device figures: a roofline estimate of its layer times.

        Decode reads every weight once per token (bandwidth-bound); prefill of many tokens is
        compute-bound. Both pay the kernel launches.
        """
        if tflops <= 0 or memory_gbps <= 0:
            raise ValueError(f"node {node_id}: tflops and memory bandwidth must be positive")
        flops_per_ms = tflops * 1e9
        bytes_per_ms = memory_gbps * GB / 1e3
        launches = KERNELS_PER_LAYER * launch_ms
        decode = max(model.layer_bytes / bytes_per_ms, model.layer_flops / flops_per_ms) + launches
        prefill = max(model.layer_bytes / bytes_per_ms, prefill_tokens * model.layer_flops / flops_per_ms)
        head = model.head_bytes / bytes_per_ms + 2 * launch_ms
        return cls(
            node_id,
            memory_bytes,
            decode_layer_ms=decode,
            head_ms=head,
            prefill_layer_ms=prefill + launches,
            prefill_tokens=prefill_tokens,
            score=tflops,
            stage_ms=STAGE_KERNELS * launch_ms,
        )

    @classmethod
    def measured(
        cls,
        node_id: str,
        model: ModelSpec,
        *,
        memory_bytes: int,
        decode_layer_ms: float,
        prefill_layer_ms: float,
        prefill_tokens: int,
        measured_layer_bytes: int,
        stage_ms: float = 0.0,
        score: float = 0.0,
    ) -> NodeSpec:
        """A node with measured layer times; the head is scaled from the layer by weight bytes
        (decode is bandwidth-bound, so time follows bytes read)."""
        per_byte = decode_layer_ms / max(1, measured_layer_bytes)
        return cls(
            node_id,
            memory_bytes,
            decode_layer_ms=decode_layer_ms,
            head_ms=per_byte * model.head_bytes,
            prefill_layer_ms=prefill_layer_ms,
            prefill_tokens=prefill_tokens,
            score=score or 1.0 / decode_layer_ms,
            stage_ms=stage_ms,
        )


@dataclass(frozen=True)
class Link:
    """A network path between two nodes: round trip and bandwidth (bytes per second)."""

    rtt_ms: float
    bytes_per_s: float

    def __post_init__(self) -> None:
        if not (self.rtt_ms >= 0 and self.bytes_per_s > 0):
            raise ValueError(f"a link needs rtt_ms >= 0 and bandwidth > 0, got {self}")

    def transfer_ms(self, nbytes: int) -> float:
        """One-way time of a message of ``nbytes``: half the round trip plus serialisation."""
        return self.rtt_ms / 2 + nbytes / self.bytes_per_s * 1e3


# Gigabit Ethernet through one switch, for nodes nobody has measured.
DEFAULT_LINK = Link(rtt_ms=0.5, bytes_per_s=117e6)


@dataclass(frozen=True)
class Network:
    """Links between nodes, looked up in either direction; unmeasured pairs get ``default``.
    ``wire``: the host's ``--wire`` (plan/wire.py), so a hop is costed in the bytes its hidden
    states take on that link."""

    links: Mapping[tuple[str, str], Link] = field(default_factory=dict)
    default: Link = DEFAULT_LINK
    wire: str = "native"

    def measured(self, a: str, b: str) -> bool:
        return (a, b) in self.links or (b, a) in self.links

    def link(self, a: str, b: str) -> Link:
        return self.links.get((a, b)) or self.links.get((b, a)) or self.default

    def hop_ms(self, a: str, b: str, nbytes: int) -> float:
        if a == b:
            return 0.0
        return self.link(a, b).transfer_ms(nbytes + MESSAGE_OVERHEAD_BYTES)


@dataclass(frozen=True)
class Budget:
    """What must fit besides the weights: KV cache for ``sessions`` answers of ``context_tokens``,
    and ``headroom`` (a fraction of each node's memory kept free for activations and the system)."""

    context_tokens: int = 4096
    sessions: int = 1
    headroom: float = 0.1

    def __post_init__(self) -> None:
        if self.context_tokens < 1 or self.sessions < 1:
            raise ValueError("context_tokens and sessions must be at least 1")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {self.headroom}")

    def usable(self, memory_bytes: int) -> int:
        return int(memory_bytes * (1 - self.headroom))

    def kv_bytes_per_layer(self, model: ModelSpec) -> int:
        """What a layer's KV cache takes: ``context_tokens`` per session, within the model's context
        (the stages allocate no more than that)."""
        return model.kv_bytes_per_token * self.tokens(model) * self.sessions

    def tokens(self, model: ModelSpec) -> int:
        """Positions a session holds: ``context_tokens``, within the model's context."""
        return min(self.context_tokens, model.max_positions) if model.max_positions else self.context_tokens
