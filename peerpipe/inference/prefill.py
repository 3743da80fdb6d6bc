"""Where the host cuts a prompt for a room: whole, or in chunks pipelined across the stages
(docs/inference.md, "Pipelined prefill")."""

from __future__ import annotations

from peerpipe.protocol import Plan

# Prompts of at least twice this many tokens go to a room of several stages in chunks of about
# this size, pipelined across the stages (small enough to overlap, large enough to stay efficient)...
PREFILL_CHUNK = 128
# ...by default only where a token takes at least this long: on CPUs and small GPUs a chunk's work
# dwarfs what a chunk costs besides (1.5-1.8x sooner on CPU); on an H200 a 1B model's whole
# prompt takes a few ms, and chunks made its first token 1.6-6.3x later (docs/bench/prefill-*.txt).
AUTO_CHUNK_MS = 20.0


def prefill_bounds(length: int, plan: Plan, chunk: int | None) -> list[int]:
    """Where a prompt of ``length`` tokens is cut for ``plan``: ``[0, length]`` (whole), or chunks
    of about ``chunk`` tokens (at least ``chunk`` each) on a plan of several stages; ``None``:
    chunks of ``PREFILL_CHUNK`` where the plan predicts ``AUTO_CHUNK_MS`` or more a token."""
    if chunk is None:
        chunk = PREFILL_CHUNK if plan.predicted_ms >= AUTO_CHUNK_MS else 0
    count = max(1, length // chunk) if len(plan.stages) > 1 and chunk > 0 else 1
    return [length * i // count for i in range(count + 1)]
