"""Where the host cuts a prompt for a room: whole, or in chunks pipelined across the stages
(docs/inference.md, "Pipelined prefill")."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from peerpipe.engine.sampling import SamplingParams
from peerpipe.inference.wire import sampling_to_wire, to_wire
from peerpipe.protocol import ComputeRequest, Plan, SessionSpec

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


def prefill_requests(
    task_id: str, history: Sequence[int], params: SamplingParams, plan: Plan, chunk: int | None
) -> list[ComputeRequest]:
    """An answer's first step on a plan: the prompt and every token emitted so far. On a plan of
    several stages a long prompt goes as chunks sent back to back, every one but the last
    ``partial``: stage 1 runs the second chunk while stage 2 runs the first, and the hops'
    transfers overlap the work (docs/inference.md, "Pipelined prefill")."""
    history = list(history)
    penalty = to_wire(torch.tensor(history, dtype=torch.long)) if params.repetition_penalty != 1.0 else None
    spec = SessionSpec(sampling_to_wire(params), penalty)
    return [
        ComputeRequest(
            task_id, to_wire(torch.tensor([history[a:b]], dtype=torch.long)), task_id, plan.version, a,
            spec if a == 0 else None, partial=b < len(history),
        )
        for a, b in itertools.pairwise(prefill_bounds(len(history), plan, chunk))
    ]
