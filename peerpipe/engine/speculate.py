"""Speculative decoding, the parts that know nothing of the network: the n-gram drafter, the
verifier's rule, and how many tokens to draft.

A step sends the answer's last token and ``k`` drafted ones through the model in one pass. Row
``j`` of the last stage's logits picks the token that follows the first ``j`` drafts; the model
keeps the drafts up to the first one it would not have picked, plus its own pick there (or after
the last draft). Each pick is drawn exactly as without drafts: greedy, or with the session's
noise for that position (``sampling.draw_seed``). So a draft changes how many tokens a step
yields, never which: greedy and seeded answers equal ``--speculate off`` token for token, and an
unseeded answer's tokens are distributed exactly as the model's.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from peerpipe.engine.errors import EngineError

if TYPE_CHECKING:  # the CLI reads this module's settings without loading torch
    import torch

    from peerpipe.engine.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

SPECULATE_MODES = ("off", "ngram", "draft")
# A step of 7 drafts has 8 positions: on CUDA it fills a graph of width 8 with no padding.
DEFAULT_MAX_DRAFT = 7
MAX_DRAFT_LIMIT = 64  # a step of more positions than this is a prefill, not a verification


class SpeculationError(EngineError, ValueError):
    """A speculation setting is out of range; the message names it."""


def check_mode(mode: str) -> str:
    if mode not in SPECULATE_MODES:
        raise SpeculationError(f"speculate must be one of {', '.join(SPECULATE_MODES)}, not {mode!r}")
    return mode


def check_max_draft(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_LIMIT:
        raise SpeculationError(f"speculate-max must be an int in [1, {MAX_DRAFT_LIMIT}], not {k!r}")
    return k


def accepted_tokens(picks: Sequence[int], drafts: Sequence[int]) -> list[int]:
    """``picks[j]`` is the model's token after the first ``j`` drafts (``len(drafts) + 1`` of
    them): the drafts it agrees with, then its own pick where it first disagrees (or after all)."""
    if len(picks) != len(drafts) + 1:
        raise ValueError(f"{len(picks)} picks for {len(drafts)} drafts; a verification has one more")
    out: list[int] = []
    for pick, draft in zip(picks, drafts, strict=False):
        out.append(int(pick))
        if pick != draft:
            return out
    out.append(int(picks[-1]))
    return out


def verify(
    sampler: Sampler,
    rows: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    history: list[int],
    drafts: Sequence[int],
    first: int,
) -> list[int]:
    """The tokens a step of ``drafts`` yields. ``rows`` ``[len(drafts) + 1, V]`` are the logits
    after the answer's last token and after each draft; ``history`` the answer so far (for a
    repetition penalty); ``first`` the position of the first new token. Each row's pick is drawn as
    an undrafted step at that position would draw it."""
    picks = sampler.sample(
        rows,
        [params] * len(rows),
        [generator] * len(rows),
        [history + list(drafts[:j]) for j in range(len(rows))],
        [first + j for j in range(len(rows))],
    ).tolist()
    return accepted_tokens(picks, drafts)


class Drafter(Protocol):
    """Proposes up to ``k`` tokens to follow ``history`` (the prompt and the answer so far)."""

    def propose(self, history: Sequence[int], k: int) -> list[int]: ...

    def close(self) -> None: ...


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the history's last
    ``n`` tokens (the longest ``n`` from ``max_n`` down to ``min_n`` that occurred before). Copying,
    quoting and editing a given text repeat long runs of it, which this finds at no model cost.

    The history only grows during an answer, so each n-gram is indexed once."""

    def __init__(self, max_n: int = 4, min_n: int = 2) -> None:
        if not 1 <= min_n <= max_n:
            raise SpeculationError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self._seen: list[int] = []
        # n -> n-gram -> where the latest occurrence's continuation starts
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}

    def _catch_up(self, history: Sequence[int]) -> None:
        if len(history) < len(self._seen) or list(history[: len(self._seen)]) != self._seen:
            self._seen = []  # another history (a replayed answer): index it afresh
            for table in self._index.values():
                table.clear()
        start = len(self._seen)
        self._seen.extend(int(t) for t in history[start:])
        seen = self._seen
        # Continuations that start before the end: the n-gram ending at the last token is the
        # query, not a match, until a later token follows it.
        for end in range(max(start, self.min_n), len(seen)):
            for n, table in self._index.items():
                if end >= n:
                    table[tuple(seen[end - n : end])] = end

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        self._catch_up(history)
        seen = self._seen
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(seen) <= n:
                continue
            at = self._index[n].get(tuple(seen[-n:]))
            if at is not None:
                return seen[at : at + k]
        return []

    def close(self) -> None:
        self._seen = []


@dataclass
class SpecStats:
    """What speculation did for one answer (or summed over many)."""

    mode: str = "off"
    steps: int = 0  # decode steps sent through the model
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # of those, kept in the answer
    tokens: int = 0  # tokens the decode steps yielded into the answer (steps + accepted)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    def add(self, other: SpecStats) -> None:
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.tokens += other.tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": round(self.acceptance, 4),
            "tokens_per_step": round(self.tokens_per_step, 4),
        }


COST_SAMPLES = 5  # a size's cost is the median of its last few steps
PROBE_EVERY = 32  # steps without drafting before one step at the largest size re-measures it


@dataclass
class StepCosts:
    """The time of a decode step by how many tokens it drafted, for one room (the hops and
    compute are the room's, whatever the answer); drafting time counts in. Each size's figure is
    the median of its last few steps, and its first step is not counted: on a GPU it captures
    the graphs of that width, which take many times a step."""

    seconds: dict[int, float] = field(default_factory=dict)
    _samples: dict[int, collections.deque[float]] = field(default_factory=dict, repr=False)

    def record(self, k: int, seconds: float) -> None:
        samples = self._samples.get(k)
        if samples is None:
            self._samples[k] = collections.deque(maxlen=COST_SAMPLES)
            return
        samples.append(seconds)
        self.seconds[k] = statistics.median(samples)

    def clear(self) -> None:
        self.seconds.clear()
        self._samples.clear()

    def estimate(self, k: int) -> float | None:
        """Measured, else a straight line through the measured sizes (None with fewer than two)."""
        if k in self.seconds:
            return self.seconds[k]
        if len(self.seconds) < 2:
            return None
        ks = sorted(self.seconds)
        mean_k = sum(ks) / len(ks)
        mean_t = sum(self.seconds[x] for x in ks) / len(ks)
        spread = sum((x - mean_k) ** 2 for x in ks)
        slope = sum((x - mean_k) * (self.seconds[x] - mean_t) for x in ks) / spread
        return max(1e-9, mean_t + max(0.0, slope) * (k - mean_k))


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a step of ``k`` drafts yields when each draft is kept with probability ``acceptance``
    given the ones before it were: 1 + a + a^2 + ... + a^k."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(k + 1) if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)


class DraftSize:
    """How many tokens one answer drafts next: the ``k`` in [0, max_k] with the most expected
    tokens per second, from this answer's acceptance rate (a running mean over observed draft
    positions) and the room's measured step times. Until both ends are measured it tries them:
    one plain step, then one of ``max_k``."""

    def __init__(
        self, costs: StepCosts, max_k: int, prior: float = 0.5, weight: float = 0.15, *, fixed: bool = False
    ) -> None:
        self.costs, self.max_k = costs, max_k
        self.fixed = fixed  # always max_k: for measuring a size, not for serving
        self.acceptance = prior
        self._weight = weight
        self._plain_steps = 0

    def observe(self, drafted: int, accepted: int) -> None:
        """A verification kept ``accepted`` of ``drafted`` drafts: each kept one is a success, the
        first dropped one a failure; later ones were never judged."""
        w = self._weight
        for _ in range(accepted):
            self.acceptance += w * (1.0 - self.acceptance)
        if accepted < drafted:
            self.acceptance -= w * self.acceptance

    def choose(self) -> int:
        if self.max_k <= 0 or self.fixed:
            return max(self.max_k, 0)
        base = self.costs.estimate(0)
        if base is None:
            return 0
        top = self.costs.estimate(self.max_k)
        if top is None or self._plain_steps >= PROBE_EVERY:
            self._plain_steps = 0
            return self.max_k
        best_k, best_rate = 0, 1.0 / base
        for k in range(1, self.max_k + 1):
            cost = self.costs.estimate(k)
            if cost is None or not math.isfinite(cost):
                continue
            rate = expected_tokens(self.acceptance, k) / cost
            if rate > best_rate * 1.02:  # a tie is not worth the extra compute
                best_k, best_rate = k, rate
        if best_k == 0:
            self._plain_steps += 1
        return best_k


class Drafts:
    """One answer's drafting, wherever its steps run (the local engine, a room's host): its
    drafter, how many it drafts each step, and what that did. A prompt-lookup drafter costs
    nothing, so on a step that does not draft, its guess is still checked against the token that
    comes, and the acceptance rate stays current."""

    def __init__(self, mode: str, drafter: Drafter, size: DraftSize) -> None:
        self.drafter, self.size = drafter, size
        self.stats = SpecStats(mode=mode)
        self._free = isinstance(drafter, NgramDrafter)
        self._shadow: list[int] = []
        self._failed = False

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` drafts to follow ``history`` (``k`` from ``size.choose()``, capped by the
        caller at what the answer has room for)."""
        self._shadow = []
        if self._free:
            guess = self._draft(history, self.size.max_k)
            if k <= 0:
                self._shadow = guess
                return []
            return guess[:k]
        return self._draft(history, k) if k > 0 else []

    def _draft(self, history: Sequence[int], k: int) -> list[int]:
        if self._failed:
            return []
        try:
            return self.drafter.propose(history, k)
        except Exception as exc:  # drafts never change an answer's tokens: a drafter's fault must not end it
            log.warning("drafting stopped for this answer: %s: %s", type(exc).__name__, exc)
            self._failed = True
            return []

    def observe(self, sent: Sequence[int], tokens: Sequence[int], seconds: float) -> SpecStats:
        """A step sent ``sent`` and yielded ``tokens`` in ``seconds``; returns the step's figures."""
        kept = len(tokens) - 1
        self.size.costs.record(len(sent), seconds)
        if sent:
            self.size.observe(len(sent), kept)
        elif self._shadow and tokens:
            self.size.observe(1, int(self._shadow[0] == tokens[0]))  # only the first was judged
        step = SpecStats(steps=1, drafted=len(sent), accepted=kept, tokens=len(tokens))
        self.stats.add(step)
        return step

    def unused(self, count: int) -> SpecStats:
        """The answer ended ``count`` tokens before its last step's end (a stop or the budget
        inside a kept block): those were never the answer's, so they leave the figures."""
        cut = SpecStats(accepted=-count, tokens=-count)
        self.stats.add(cut)
        return cut

    def close(self) -> None:
        self.drafter.close()
