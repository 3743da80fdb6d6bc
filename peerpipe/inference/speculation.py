"""Speculation at the host: which drafter an answer uses, how many tokens each step drafts, and
what it did. The stages verify (``StageServer._verify``); the rule is in engine/speculate.py.

An answer's step sends its last token and ``k`` drafts; the last stage returns the drafts it
keeps and one token of its own. ``k`` comes from the answer's acceptance rate and the room's
measured step times (``DraftSize``), so a slow link drafts more and a fast one stops drafting
when it does not pay. One answer's drafting is ``engine.speculate.Drafts``, as in the local engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from peerpipe.compute import run_compute
from peerpipe.engine.decode import Decoding
from peerpipe.engine.draft_model import DraftModel, DraftModelError, DraftSession
from peerpipe.engine.speculate import (
    DEFAULT_MAX_DRAFT,
    Drafts,
    DraftSize,
    NgramDrafter,
    SpecStats,
    StepCosts,
    check_max_draft,
    check_mode,
)
from peerpipe.inference.errors import PromptError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeculationConfig:
    mode: str = "ngram"  # for answers that do not choose: off, ngram, or draft (needs a draft model)
    max_draft: int = DEFAULT_MAX_DRAFT  # most tokens one step drafts
    adaptive: bool = True  # False: every step drafts max_draft (to measure that size)

    def __post_init__(self) -> None:
        check_mode(self.mode)
        check_max_draft(self.max_draft)


class Speculator:
    """The room's speculation: its settings, the draft model (if any), the measured step times,
    and the totals over every answer."""

    def __init__(self, config: SpeculationConfig | None = None, draft: DraftModel | None = None) -> None:
        self.config = config or SpeculationConfig()
        if self.config.mode == "draft" and draft is None:
            raise PromptError("speculate=draft needs a draft model (peerpipe host --draft DIR)")
        self.draft = draft
        self.costs = StepCosts()
        self.totals = SpecStats(mode="all")  # every answer's, whatever mode it asked for
        self.modes: dict[str, SpecStats] = {}  # the same, by mode
        # Each mode's acceptance over recent answers: where a new answer's estimate starts.
        self.acceptance: dict[str, float] = {}

    def mode_for(self, asked: str) -> str:
        """The mode an answer runs in: its own choice, else the room's."""
        mode = check_mode(asked) if asked else self.config.mode
        if mode == "draft" and self.draft is None:
            raise PromptError("this room has no draft model: start the host with --draft DIR, or ask for ngram")
        return mode

    def for_answer(self, mode: str, decoding: Decoding) -> AnswerDrafts | None:
        if mode == "off":
            return None
        session: DraftSession | None = None
        if mode == "draft":
            assert self.draft is not None
            try:
                session = self.draft.session(decoding.params)
            except DraftModelError as exc:  # every draft slot busy: prompt lookup still helps
                log.info("answer drafts by prompt lookup: %s", exc)
                mode = "ngram"
        prior = self.acceptance.get(mode, 0.5)
        size = DraftSize(self.costs, self.config.max_draft, prior=prior, fixed=not self.config.adaptive)
        return AnswerDrafts(self, mode, session, size)

    def add(self, step: SpecStats, mode: str) -> None:
        self.totals.add(step)
        self.modes.setdefault(mode, SpecStats(mode=mode)).add(step)

    def to_json(self) -> dict[str, object]:
        """The totals, and each mode's (``modes``), for the dashboard and ``/api/room``."""
        return {**self.totals.to_json(), "modes": {m: s.to_json() for m, s in sorted(self.modes.items())}}

    def finished(self, drafts: AnswerDrafts) -> None:
        if drafts.stats.steps:
            old = self.acceptance.get(drafts.stats.mode, drafts.size.acceptance)
            self.acceptance[drafts.stats.mode] = old + 0.5 * (drafts.size.acceptance - old)

    def reset_costs(self) -> None:
        """Other stages, other hops: step times are measured again."""
        self.costs.clear()


class AnswerDrafts:
    """One answer's drafting at the host (``engine.speculate.Drafts``), with the room's totals;
    a draft model on a CPU drafts on the compute thread."""

    def __init__(self, room: Speculator, mode: str, session: DraftSession | None, size: DraftSize) -> None:
        self.room = room
        self.core = Drafts(mode, session if session is not None else NgramDrafter(), size)
        self._threaded = session is not None and session.model.device.type != "cuda"

    @property
    def stats(self) -> SpecStats:
        return self.core.stats

    @property
    def size(self) -> DraftSize:
        return self.core.size

    async def propose(self, decoding: Decoding) -> list[int]:
        """The drafts for the answer's next step (none when drafting does not pay, or no room)."""
        left = decoding.budget - len(decoding.tokens) - 1  # a step yields up to k + 1 tokens
        k = min(self.size.choose(), left)
        if self._threaded and k > 0:
            return await run_compute(self.core.propose, decoding.history, k)
        # Prompt lookup costs microseconds; a CUDA draft model replays graphs, launched in
        # microseconds, on the loop where the stages' graphed steps run too (two threads capturing
        # CUDA graphs in one process break each other's capture).
        return self.core.propose(decoding.history, k)

    def observe(self, drafts: list[int], tokens: list[int], seconds: float) -> None:
        """A step sent ``drafts`` and got ``tokens`` back in ``seconds``."""
        self.room.add(self.core.observe(drafts, tokens, seconds), self.stats.mode)

    def unused(self, count: int) -> None:
        """The answer ended ``count`` tokens before its last step's end."""
        self.room.add(self.core.unused(count), self.stats.mode)

    def close(self) -> None:
        self.room.finished(self)
        self.core.close()
