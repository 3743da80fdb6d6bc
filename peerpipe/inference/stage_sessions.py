"""What a stage keeps for each answer it serves: its KV-cache slot and, on the last stage, how
its tokens are drawn (sampling parameters, random generator, the tokens a repetition penalty
looks back on); the typed refusal of a request a stage cannot run; the stage's step counts;
and which prompts share a forward."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from peerpipe.engine import gpu_wait
from peerpipe.engine.sampling import Sampler, SamplingParams, make_generator
from peerpipe.engine.speculate import verify
from peerpipe.inference.wire import ids_to_wire, sampling_from_wire
from peerpipe.protocol import ComputeRequest, SessionSpec, TensorData

INLINE_AFTER, INLINE_MAX_S = 4, 0.05  # decode steps measured before one runs inline, and their longest mean
PROMPT_BATCH_TOKENS = 4096  # prompts of one length share a forward up to this many tokens in all


@dataclass
class StageStats:
    """Decode forwards run (one new position per answer; a batch counts once) and the seconds
    they took; one per node, kept across plans."""

    steps: int = 0
    compute_s: float = 0.0

    def short(self) -> bool:
        """Whether the decode steps, measured a few times, are short enough to run on the event
        loop's thread (heartbeats wait meanwhile; a member is suspected after 3 s without one)."""
        return self.steps >= INLINE_AFTER and self.compute_s / self.steps < INLINE_MAX_S


class RequestError(Exception):
    """A request this stage cannot run; its text goes back to the host."""


@dataclass
class Session:
    slot: int
    params: SamplingParams | None = None  # last stage only
    generator: torch.Generator | None = None
    history: list[int] = field(default_factory=list)

    def open_sampling(self, spec: SessionSpec | None, device: torch.device) -> None:
        """Take the answer's sampling choices (the last stage draws its tokens)."""
        spec = spec or SessionSpec()
        try:
            params = sampling_from_wire(spec.sampling)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        self.params = params
        self.generator = None if params.greedy else make_generator(params.seed, device)
        if params.repetition_penalty != 1.0 and spec.history is not None:
            self.history = [int(t) for t in spec.history.to_numpy().reshape(-1)]

    def verify(self, sampler: Sampler, request: ComputeRequest, logits: torch.Tensor) -> TensorData:
        """The model's pick after each prefix of the drafts, each drawn as an undrafted step would
        draw it (engine/speculate.py); the drafts it keeps and its own next token."""
        drafts = list(request.drafts)
        rows = logits[-len(drafts) - 1 :]  # the answer's last token, then each draft
        params = self.params or SamplingParams(temperature=0.0)
        first = request.start_pos + logits.shape[0] - len(drafts)  # where the first pick goes
        kept = verify(sampler, rows, params, self.generator, self.history, drafts, first)
        if params.repetition_penalty != 1.0:
            self.history.extend(kept)
        return ids_to_wire(kept)


def sample(sampler: Sampler, logits: torch.Tensor, sessions: list[Session], positions: list[int]) -> torch.Tensor:
    """The sessions' next tokens, on the logits' device (nothing waits for them)."""
    params = [s.params or SamplingParams(temperature=0.0) for s in sessions]
    return sampler.sample(logits, params, [s.generator for s in sessions], [s.history for s in sessions], positions)


def draw(sampler: Sampler, logits: torch.Tensor, sessions: list[Session], positions: list[int]) -> list[int]:
    """The last stage's next token for each session, from its logits ``[B, vocab]``; ``positions``:
    where each new token goes. On a GPU the ids come back through pinned memory, polled for."""
    tokens = sample(sampler, logits, sessions, positions)
    if tokens.is_cuda:
        tokens = tokens.to("cpu", non_blocking=True)  # into pinned memory: the wait is ours
        gpu_wait.wait(logits.device)
    ids = tokens.tolist()
    for session, token in zip(sessions, ids, strict=True):
        if session.params is not None and session.params.repetition_penalty != 1.0:
            session.history.append(int(token))
    return ids


def prompt_groups(
    prompts: list[ComputeRequest], new_positions: Callable[[ComputeRequest], int], max_batch: int
) -> list[list[ComputeRequest]]:
    """Whole prompts of one length share a forward (answers started together often have them),
    up to ``PROMPT_BATCH_TOKENS`` and ``max_batch``; chunks, and a task's second request, run
    alone, in order."""
    tasks = collections.Counter(p.task_id for p in prompts)
    groups: list[list[ComputeRequest]] = []
    open_groups: dict[int, list[ComputeRequest]] = {}
    for prompt in prompts:
        n = new_positions(prompt)
        if prompt.partial or tasks[prompt.task_id] > 1:
            groups.append([prompt])
            continue
        group = open_groups.get(n)
        if group is None or (len(group) + 1) * n > PROMPT_BATCH_TOKENS or len(group) >= max_batch:
            group = open_groups[n] = []
            groups.append(group)
        group.append(prompt)
    return groups
