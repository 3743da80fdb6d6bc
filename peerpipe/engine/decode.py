"""The decode loop, written once: an answer's tokens, stop checks, budget, streamed text and
timings, free of how a step is computed.

The local engine and the room's pipeline each drive a ``Decoding``: they compute a step their
own way (one forward here, a trip through the stages there), ``push`` the sampled token, and go
on while it returns True. ``next_position`` says where the next step's one new token sits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peerpipe.engine.errors import CacheError
from peerpipe.engine.sampling import SamplingParams, StopChecker
from peerpipe.engine.speculate import SpecStats
from peerpipe.engine.tokenizer import Tokenizer

OnText = Callable[[str], None]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_ids: list[int]
    finish_reason: str
    prefill_s: float  # prompt forward + first token
    decode_s: float  # every later token
    warmup_s: float = 0.0  # CUDA-graph captures made before the prompt's forward, apart from both
    speculation: SpecStats | None = None  # what drafting did, when the answer drafted

    @property
    def tok_s(self) -> float:
        """Decode speed: tokens after the first, over the time they took."""
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "prompt_ids": self.prompt_ids,
            "finish_reason": self.finish_reason,
            "tok_s": round(self.tok_s, 3),
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "warmup_s": round(self.warmup_s, 6),
            **({"speculation": self.speculation.to_json()} if self.speculation is not None else {}),
        }


def check_prompt(prompt: Sequence[int], max_seq: int, where: str = "this engine") -> None:
    """A prompt must have a token and leave a position for the answer."""
    if not prompt:
        raise CacheError("the prompt is empty: give at least one token")
    if len(prompt) + 1 > max_seq:
        raise CacheError(f"the prompt has {len(prompt)} tokens; {where} holds {max_seq} positions in all")


class Decoding:
    """One answer being decoded. Create it when the prompt's step starts; ``push`` every token."""

    def __init__(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        *,
        max_seq: int,
        on_text: OnText | None = None,
        where: str = "this engine",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.prompt = list(prompt)
        check_prompt(self.prompt, max_seq, where)
        self.params = params
        self.budget = min(params.max_tokens, max_seq - len(self.prompt))
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._stopper = StopChecker(params, tokenizer.eos_ids, tokenizer.stream_decoder())
        self._on_text = on_text
        self._clock = clock
        self.started = clock()
        self.first_token: float | None = None
        self.finished: float | None = None

    @property
    def next_position(self) -> int:
        """Where the last token, fed back as the next step's input, sits in the sequence."""
        return len(self.prompt) + len(self.tokens) - 1

    @property
    def history(self) -> list[int]:
        """Prompt and answer so far (a repetition penalty looks at both)."""
        return self.prompt + self.tokens

    def push(self, token: int) -> bool:
        """Take the next sampled token; True while the answer goes on."""
        if self.first_token is None:
            self.first_token = self._clock()
        self.tokens.append(token)
        step = self._stopper.update(token)
        self._emit(step.text)
        if step.finish_reason is not None:
            self.finish(step.finish_reason)
        elif len(self.tokens) >= self.budget:
            self._emit(self._stopper.finish())
            self.finish("length")
        return self.finish_reason is None

    def goes_on_after(self, token: int) -> bool:
        """Whether a step must follow ``token`` unless its text completes a stop string: what a
        room's host may send before pushing it (the id and count checks are cheap, text is not)."""
        return len(self.tokens) + 1 < self.budget and not self._stopper.ends_at(token)

    def finish(self, reason: str) -> None:
        """End the answer here (stop, length, cancelled, or an error's)."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finished = self._clock()

    def _emit(self, text: str) -> None:
        if text and self._on_text is not None:
            self._on_text(text)

    def result(self) -> GenerationResult:
        end = self.finished if self.finished is not None else self._clock()
        first = self.first_token if self.first_token is not None else end
        return GenerationResult(
            self._stopper.text,
            list(self.tokens),
            list(self.prompt),
            self.finish_reason or "error",
            first - self.started,
            end - first,
        )
