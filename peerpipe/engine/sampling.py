"""Choosing the next token: sampling parameters, a batched sampler, and stop conditions.

One batch mixes sessions with different parameters and seeds. Filters follow Hugging Face's
order and semantics (repetition penalty -> temperature -> top-k -> top-p -> min-p) so that
results can be checked against ``transformers``. Each session owns a ``torch.Generator``; the
random draw for a row comes only from that row's generator, so a seeded session produces the
same tokens whatever else shares its batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from peerpipe.engine import argmax_cuda
from peerpipe.engine.errors import InvalidSamplingParams
from peerpipe.engine.tokenizer import StreamDecoder

FinishReason = Literal["stop", "length"]

# Below this a temperature is treated as greedy: dividing by it would overflow float32 logits.
_GREEDY_EPS = 1e-5


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidSamplingParams(message)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one session picks tokens and when it stops. Neutral values switch a filter off."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; applies to prompt and output tokens
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept lists from JSON callers but store tuples, so the object stays hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and self.temperature >= 0,
            f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}",
        )
        _check(
            _is_int(self.top_k) and self.top_k >= 0,
            f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}",
        )
        _check(
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
            f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}",
        )
        _check(
            isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1,
            f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}",
        )
        _check(
            isinstance(self.repetition_penalty, (int, float))
            and math.isfinite(self.repetition_penalty)
            and self.repetition_penalty > 0,
            f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}",
        )
        _check(self.seed is None or _is_int(self.seed), f"seed must be an int or None, got {self.seed!r}")
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            f"max_tokens must be an int >= 1, got {self.max_tokens!r}",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            f"stop must be a list of non-empty strings, got {self.stop!r}",
        )
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}",
        )
        _check(isinstance(self.ignore_eos, bool), f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A session's generator, on the device where its logits live. A seeded session's draws are
    keyed by position (``draw_seed``), so this seed only serves unseeded ones."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % (1 << 64))
    return g


_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, position: int) -> int:
    """The seed of a seeded session's draw for the token at ``position`` (splitmix64 of both): the
    draw depends on where it is, not on how many draws came before, so a stage that replays an
    answer after a failover, or a verifier that rolls back, draws the same numbers again."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


History = Sequence[int] | torch.Tensor


def apply_repetition_penalty(logits: torch.Tensor, row: int, penalty: float, history: History) -> None:
    """In place, as transformers: seen tokens' positive logits / penalty, negative ones * penalty."""
    ids = torch.as_tensor(history, dtype=torch.long, device=logits.device).unique()
    if ids.numel() == 0:
        return
    seen = logits[row, ids]
    logits[row, ids] = torch.where(seen < 0, seen * penalty, seen / penalty)


def warp(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for sampled rows, in place on float32 ``logits`` [B, V]."""
    dev, neg_inf = logits.device, float("-inf")
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    logits.div_(temps.unsqueeze(1))

    if any(p.top_k > 0 for p in params):
        ks = torch.tensor([p.top_k for p in params], device=dev).clamp(max=logits.shape[1])
        top = logits.topk(int(ks.max()), dim=-1).values  # [B, kmax], descending
        kth = top.gather(1, (ks.clamp(min=1) - 1).unsqueeze(1))
        kth = torch.where(ks.unsqueeze(1) > 0, kth, torch.full_like(kth, neg_inf))
        logits.masked_fill_(logits < kth, neg_inf)  # ties with the k-th survive, as in HF

    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=dev)
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # the most likely token always stays
        logits.masked_fill_(drop.scatter(1, order, drop), neg_inf)

    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=dev)
        probs = logits.softmax(dim=-1)
        floor = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        logits.masked_fill_(probs < floor, neg_inf)
    return logits


@functools.cache
def argmax_chunk(vocab: int) -> int | None:
    """The chunk width that splits a row of ``vocab`` logits evenly for a two-pass argmax (a
    divisor near 512: many short chunks keep the GPU busiest), or None when the row is short or
    has no such divisor."""
    if vocab < 16384:
        return None
    divisors = [c for c in range(128, 4097) if vocab % c == 0]
    return min(divisors, key=lambda c: abs(c - 512)) if divisors else None


def row_argmax(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``x.argmax(-1)`` of a ``[B, V]`` tensor, the same index (the first maximum; NaN wins). On
    CUDA torch reduces a row in one thread block, 26 to 36 us for a 128k vocabulary on an H200
    (3% of a 1B model's token): there one kernel of ours takes it (argmax_cuda.py, 3.5 us), or
    without Triton two passes, per-chunk maxima then the best chunk (10 us); ``chunk`` forces
    the two passes."""
    if chunk is None and x.is_cuda:
        if argmax_cuda.fits(x):
            return argmax_cuda.argmax(x)  # one kernel, about 3 µs
        chunk = argmax_chunk(x.shape[-1])
    if chunk is None:
        return x.argmax(dim=-1)
    # max(dim) returns the first maximum of each chunk; the first best chunk holds the first
    # maximum of the row.
    best, where = x.unflatten(-1, (-1, chunk)).max(dim=-1)
    pick = best.argmax(dim=-1, keepdim=True)
    return where.gather(-1, pick).squeeze(-1).add_(pick.squeeze(-1), alpha=chunk)


class Sampler:
    """Picks one token per row of a ``[B, V]`` logits tensor, each row with its own params."""

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        history: Sequence[History | None] | None = None,
        positions: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Return a LongTensor [B] on ``logits.device``.

        ``generators[i]`` must live on ``logits.device``; None uses torch's global generator.
        ``history[i]`` (prompt and output ids) is needed only when row i has a repetition penalty.
        ``positions[i]`` is where row i's new token goes; with a seed, its draw depends only on
        (seed, position).
        """
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(params)} rows of params")
        penalized = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not penalized and not sampled:
            return row_argmax(logits)  # the fast path: no copy, no sort

        x = logits.to(torch.float32, copy=True)
        for i in penalized:
            if history is None or history[i] is None:
                raise ValueError(f"row {i} has a repetition penalty but no token history")
            apply_repetition_penalty(x, i, params[i].repetition_penalty, history[i])  # type: ignore[arg-type]

        out = row_argmax(x)
        if sampled:
            rows = torch.tensor(sampled, device=x.device)
            probs = warp(x[rows], [params[i] for i in sampled]).softmax(dim=-1)
            noise = torch.empty_like(probs)
            for j, i in enumerate(sampled):
                # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; only this row's
                # generator is consumed, so batch neighbours cannot change the outcome.
                generator = generators[i] if generators else None
                seed = params[i].seed
                if generator is not None and seed is not None and positions is not None:
                    generator.manual_seed(draw_seed(seed, positions[i]))
                noise[j].exponential_(1.0, generator=generator)
            out[rows] = probs.div_(noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
        return out


@dataclass(frozen=True)
class StopResult:
    text: str  # text that may be shown now; never contains (part of) a stop string
    finish_reason: FinishReason | None


@dataclass
class StopChecker:
    """Per-session stop logic: EOS / stop token ids, stop strings, max_tokens.

    Feed every generated token to ``update``. With a ``decoder`` the checker turns ids into text
    itself; otherwise pass each token's text piece. Text that could be the start of a stop
    string is held back until it is known not to be one, so a stop string split across tokens is
    never shown; on a stop string the output is cut just before it.
    """

    params: SamplingParams
    eos_ids: Iterable[int] = ()
    decoder: StreamDecoder | None = None
    num_tokens: int = field(default=0, init=False)
    text: str = field(default="", init=False)  # everything released so far
    finish_reason: FinishReason | None = field(default=None, init=False)
    _held: str = field(default="", init=False, repr=False)
    _stop_ids: frozenset[int] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        eos = frozenset() if self.params.ignore_eos else frozenset(self.eos_ids)
        self._stop_ids = eos | frozenset(self.params.stop_token_ids)

    def update(self, token_id: int, piece: str | None = None) -> StopResult:
        if self.finish_reason is not None:
            raise RuntimeError("StopChecker.update called after the session finished")
        self.num_tokens += 1
        if token_id in self._stop_ids:
            # The stop token's own text is not part of the answer.
            return self._finish("stop", self._decoder_tail())
        if piece is None:
            if self.decoder is None:
                raise ValueError("pass the token's text piece, or give the StopChecker a decoder")
            piece = self.decoder.push(token_id)
        if self.num_tokens >= self.params.max_tokens:
            return self._finish("length", piece + self._decoder_tail())
        return self._release(self._held + piece)

    def ends_at(self, token_id: int) -> bool:
        """Whether ``token_id``, fed next, would end the session by its id or the token budget
        (a stop string needs its text: ``update`` finds those)."""
        return token_id in self._stop_ids or self.num_tokens + 1 >= self.params.max_tokens

    def finish(self) -> str:
        """Release held-back text when the session ends for another reason (cancelled, error)."""
        if self.finish_reason is not None:
            return ""
        return self._finish("stop", self._decoder_tail()).text

    def _decoder_tail(self) -> str:
        return self.decoder.flush() if self.decoder is not None else ""

    def _find_stop(self, buf: str) -> int:
        hits = [i for i in (buf.find(s) for s in self.params.stop) if i >= 0]
        return min(hits) if hits else -1

    def _release(self, buf: str) -> StopResult:
        cut = self._find_stop(buf)
        if cut >= 0:
            self._held = ""
            return self._finish("stop", buf[:cut], raw=True)
        hold = 0
        for s in self.params.stop:
            # The longest end of buf that a stop string starts with must wait for more text.
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        emit, self._held = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += emit
        return StopResult(emit, None)

    def _finish(self, reason: FinishReason, tail: str, *, raw: bool = False) -> StopResult:
        buf = tail if raw else self._held + tail
        cut = -1 if raw else self._find_stop(buf)
        if cut >= 0:
            buf, reason = buf[:cut], "stop"
        self._held = ""
        self.text += buf
        self.finish_reason = reason
        return StopResult(buf, reason)
