"""How each link carries hidden states: in the model's dtype, in 16 bits, or a byte per value
with a scale per block of 64 values: int8 or float8 e4m3 (protocol/tensor.py, "q8b64", "f8b64").
``auto`` never picks fp8: int8 has the finer steps near a block's largest values and measured
as close as fp8 (docs/quantization.md); fp8 keeps small values in a block with an outlier.

``auto`` weighs a link's measured bandwidth against the codec's cost: a prompt's hidden states
(``PREFILL_TOKENS`` of them) go int8 when the time their saved bytes would take on that link is
more than ``MARGIN`` times what quantizing and dequantizing them costs on a CPU. Fast Ethernet
keeps the model's dtype (and so do processes of one machine, whose loopback's measured rate
swings with load: cluster/planning.wire_formats never asks here for them); Wi-Fi or a 100 Mbit/s link gets int8, and so does gigabit Ethernet for a
model held in fp32.
"""

from __future__ import annotations

from peerpipe.plan.spec import PREFILL_TOKENS, Link, ModelSpec, Network

WIRE_CHOICES = ("auto", "native", "bf16", "fp16", "int8", "fp8")
# On the wire (PlanStage.wire): "" is the model's own dtype.
WIRE_FORMATS = ("", "bf16", "fp16", "int8", "fp8", "local")  # local: the model's dtype, through shared memory
INT8_BLOCK = 64
# Quantizing on the sender plus dequantizing on the receiver, per value, beyond what sending the
# model's dtype costs anyway: measured on the 2-core VM, one thread, 128 tokens x 384 or 4096
# values, 3 to 5 ns.
CODEC_NS_PER_VALUE = 4.0
MARGIN = 3.0


class WireChoiceError(ValueError):
    """A wire format that does not exist; the message lists those that do."""


def check_wire(choice: str) -> str:
    if choice not in WIRE_CHOICES:
        raise WireChoiceError(f"wire must be one of {', '.join(WIRE_CHOICES)}, not {choice!r}")
    return choice


def bytes_per_token(model: ModelSpec, wire: str) -> float:
    """One token's hidden state on the wire in format ``wire`` (one of WIRE_FORMATS)."""
    hidden = model.hidden_bytes / model.dtype_bytes  # values per token
    if wire in ("bf16", "fp16"):
        return hidden * 2
    if wire in ("int8", "fp8"):
        return hidden + -(-hidden // INT8_BLOCK) * 2
    return float(model.hidden_bytes)


def choose_wire(model: ModelSpec, link: Link, requested: str = "auto") -> str:
    """The wire format of a hop over ``link`` (one of WIRE_FORMATS)."""
    check_wire(requested)
    if requested != "auto":
        return "" if requested == "native" else requested
    saved = (bytes_per_token(model, "") - bytes_per_token(model, "int8")) * PREFILL_TOKENS
    saved_ms = saved / link.bytes_per_s * 1e3
    codec_ms = PREFILL_TOKENS * model.hidden_bytes / model.dtype_bytes * CODEC_NS_PER_VALUE / 1e6
    return "int8" if saved_ms > MARGIN * codec_ms else ""


def hidden_hop_ms(model: ModelSpec, network: Network, a: str, b: str, tokens: int = 1) -> float:
    """``tokens`` hidden states from ``a`` to ``b`` in the format that link gets under the
    network's ``--wire``, quantizing and dequantizing them included; unmeasured links keep the
    model's dtype under ``auto``, as cluster/planning.wire_formats sends them."""
    if a == b:
        return 0.0
    link = network.link(a, b)
    wire = network.wire
    if wire == "auto" and not network.measured(a, b):
        wire = "native"
    form = choose_wire(model, link, wire)
    codec_ms = 0.0
    if form in ("int8", "fp8"):
        codec_ms = tokens * model.hidden_bytes / model.dtype_bytes * CODEC_NS_PER_VALUE / 1e6
    return network.hop_ms(a, b, round(bytes_per_token(model, form) * tokens)) + codec_ms
