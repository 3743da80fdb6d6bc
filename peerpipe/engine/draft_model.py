"""A small model that drafts for a large one: it must share the large model's tokenizer, and it
runs beside the room's host with a KV-cache slot per answer, kept in step with the answer.

It draws its tokens as the verifier will draw the model's: greedy, or with the same (seed,
position) noise (``sampling.draw_seed``). Where the two models agree on a position's
distribution they then pick the same token, so sampled answers keep most drafts too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from peerpipe.engine.cuda_graphs import GraphedDecoder
from peerpipe.engine.errors import EngineError
from peerpipe.engine.kvcache import KVCache
from peerpipe.engine.loader import load_stage
from peerpipe.engine.model import Stage
from peerpipe.engine.sampling import Sampler, SamplingParams, make_generator
from peerpipe.engine.tokenizer import Tokenizer


class DraftModelError(EngineError):
    """The draft model cannot draft for this model; the message says why."""


def check_draft_dir(draft: str | Path, model: str | Path) -> Tokenizer:
    """The draft's tokenizer, once it is known to be the model's (its weights are not read)."""
    return _same_vocabulary(draft, Tokenizer.from_dir(model))


def _same_vocabulary(draft: str | Path, tokenizer: Tokenizer) -> Tokenizer:
    own = Tokenizer.from_dir(draft)
    if own.vocab() != tokenizer.vocab():
        raise DraftModelError(
            f"the draft model at {draft} has another tokenizer than the model ({own.vocab_size} tokens "
            f"against {tokenizer.vocab_size}); a draft must share the model's vocabulary"
        )
    return own


class DraftModel:
    """One whole small model and a KV cache with a slot for each answer being drafted."""

    def __init__(self, stage: Stage, *, sessions: int, max_seq: int, vocab_limit: int) -> None:
        if not (stage.is_first and stage.is_last):
            raise DraftModelError("a draft model runs whole, in one stage")
        self.stage = stage
        self.max_seq = min(max_seq, stage.cfg.max_positions)
        self.cache: KVCache = stage.new_cache(sessions, self.max_seq)
        self.vocab_limit = vocab_limit  # drafts are ids the large model knows
        # Models of one tokenizer may pad their embeddings to other sizes (Qwen2.5 7B has 128 rows
        # more than 3B): an id past the draft's rows is one it cannot read, so it drafts nothing.
        self.rows = stage.cfg.vocab_size
        self.sampler = Sampler()
        # On CUDA a draft step is a few dozen tiny kernels: replayed from a graph, not launched.
        self._graphed = GraphedDecoder(stage, self.cache) if self.cache.device.type == "cuda" else None

    def logits(self, ids: torch.Tensor, slot: int) -> torch.Tensor:
        """The next-token logits ``[1, V]`` after feeding ``ids`` ``[1, n]`` to ``slot``."""
        batch = self.cache.batch([slot], ids.shape[1])
        if self._graphed is not None:
            out = self._graphed(ids, batch)[:, -1]
        else:
            out = self.stage(ids, self.cache, batch, last_only=True)[:, -1]
        return out[:, : self.vocab_limit]

    @classmethod
    def load(
        cls,
        path: str | Path,
        tokenizer: Tokenizer,
        *,
        vocab_limit: int,
        sessions: int,
        max_seq: int,
        device: str | None = None,
        dtype: str | None = None,
    ) -> DraftModel:
        """Load the draft at ``path`` after checking it shares ``tokenizer`` (the large model's)."""
        _same_vocabulary(path, tokenizer)
        stage, _ = load_stage(path, device=device, dtype=dtype)
        return cls(stage, sessions=sessions, max_seq=max_seq, vocab_limit=vocab_limit)

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def session(self, params: SamplingParams) -> DraftSession:
        """A drafter for one answer sampled with ``params``; ``DraftModelError`` when every slot is
        in use (the answer then runs without a draft)."""
        if self.cache.free_slots == 0:
            raise DraftModelError(f"all {self.cache.max_slots} draft sessions are in use")
        return DraftSession(self, self.cache.alloc(), params)


class DraftSession:
    """Drafts for one answer; its slot holds the KV of ``cached``, a prefix of what it has seen."""

    def __init__(self, model: DraftModel, slot: int, params: SamplingParams) -> None:
        self.model, self.slot, self.params = model, slot, params
        self.cached: list[int] = []
        self._generator = None if params.greedy else make_generator(params.seed, model.device)
        self._closed = False

    @torch.inference_mode()
    def propose(self, history: Sequence[int], k: int) -> list[int]:
        if self._closed:
            return []
        model, cache = self.model, self.model.cache
        k = min(k, model.max_seq - len(history))
        if k <= 0:
            return []
        common = 0
        for mine, theirs in zip(self.cached, history, strict=False):
            if mine != theirs:
                break
            common += 1
        common = min(common, len(history) - 1)  # the last token is fed again, for its logits
        new = list(history[common:])
        if max(new) >= model.rows:
            return []
        cache.rollback(self.slot, common)
        # Each pick feeds the next step on the device; the drafts are read back once, at the end
        # (a repetition penalty needs every pick as it comes, so it reads each).
        penalized = self.params.repetition_penalty != 1.0
        seen = list(history) if penalized else None
        ids = torch.tensor([new], dtype=torch.long, device=model.device)
        picks = []
        for j in range(k):
            logits = model.logits(ids, self.slot)
            pick = model.sampler.sample(logits, [self.params], [self._generator], [seen], [len(history) + j])
            picks.append(pick)
            if seen is not None:
                seen.append(int(pick[0]))
            ids = pick.view(1, 1)
        drafts = [int(t) for t in torch.cat(picks).tolist()]
        self.cached = list(history) + drafts[:-1]  # what the slot holds now
        return drafts

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.model.cache.free(self.slot)
