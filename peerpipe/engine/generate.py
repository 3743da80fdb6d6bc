"""Single-node generation: a whole model in one stage, prefill then a token-by-token decode loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from peerpipe.engine.cuda_graphs import GraphedDecoder
from peerpipe.engine.errors import CacheError
from peerpipe.engine.kvcache import Batch
from peerpipe.engine.loader import LoadStats, ProgressFn, load_stage
from peerpipe.engine.model import Stage
from peerpipe.engine.sampling import Sampler, SamplingParams, StopChecker, make_generator
from peerpipe.engine.tokenizer import Tokenizer

OnText = Callable[[str], None]


def encode_prompt(
    tokenizer: Tokenizer, prompt: str, *, chat: bool = False, system: str | None = None
) -> list[int]:
    """Token ids of a plain prompt, or of one user turn wrapped in the model's chat template."""
    if not chat:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template_ids(messages, add_generation_prompt=True)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_ids: list[int]
    finish_reason: str
    prefill_s: float  # prompt forward + first token
    decode_s: float  # every later token

    @property
    def tok_s(self) -> float:
        """Decode speed: tokens after the first, over the time they took."""
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "prompt_ids": self.prompt_ids,
            "finish_reason": self.finish_reason,
            "tok_s": round(self.tok_s, 3),
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
        }


class LocalEngine:
    """Runs one whole model on one device, for one or more sessions sharing a KV cache."""

    def __init__(
        self,
        stage: Stage,
        tokenizer: Tokenizer,
        *,
        max_seq: int,
        max_sessions: int = 1,
        cuda_graphs: bool | None = None,
        compile_layers: bool = False,
    ) -> None:
        if not (stage.is_first and stage.is_last):
            raise ValueError("LocalEngine needs the whole model in one stage")
        self.stage, self.tokenizer = stage, tokenizer
        self.cache = stage.new_cache(max_sessions, max_seq)
        use_graphs = self.cache.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphed = (
            GraphedDecoder(stage, self.cache, compile_layers=compile_layers) if use_graphs else None
        )
        self._sampler = Sampler()

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_seq: int | None = None,
        max_sessions: int = 1,
        progress: ProgressFn | None = None,
        cuda_graphs: bool | None = None,
        compile_layers: bool = False,
    ) -> tuple[LocalEngine, LoadStats]:
        tokenizer = Tokenizer.from_dir(path)
        stage, stats = load_stage(path, device=device, dtype=dtype, progress=progress)
        seq = max_seq or min(stage.cfg.max_positions, 4096)
        engine = cls(
            stage,
            tokenizer,
            max_seq=seq,
            max_sessions=max_sessions,
            cuda_graphs=cuda_graphs,
            compile_layers=compile_layers,
        )
        return engine, stats

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def forward(self, ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Logits of the last new position of each row, ``[B, V]``."""
        if self._graphed is not None and ids.shape[1] == 1:
            return self._graphed(ids, batch)[:, -1]
        return self.stage(ids, self.cache, batch, last_only=True)[:, -1]

    @torch.inference_mode()
    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, on_text: OnText | None = None
    ) -> GenerationResult:
        prompt = list(prompt_ids)
        if not prompt:
            raise CacheError("the prompt is empty: give at least one token")
        limit = self.cache.max_seq
        if len(prompt) + 1 > limit:
            raise CacheError(
                f"the prompt has {len(prompt)} tokens; this engine holds {limit} positions in all"
            )
        budget = min(params.max_tokens, limit - len(prompt))
        stopper = StopChecker(params, self.tokenizer.eos_ids, self.tokenizer.stream_decoder())
        generator = make_generator(params.seed, self.device) if not params.greedy else None
        history = list(prompt)
        slot = self.cache.alloc()
        tokens: list[int] = []
        try:
            t0 = time.perf_counter()
            ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
            logits = self.forward(ids, self.cache.batch([slot], len(prompt)))
            t_first = time.perf_counter()
            while True:
                token = int(self._sampler.sample(logits, [params], [generator], [history])[0])
                if not tokens:
                    t_first = time.perf_counter()
                tokens.append(token)
                history.append(token)
                result = stopper.update(token)
                if result.text and on_text is not None:
                    on_text(result.text)
                if result.finish_reason is not None:
                    reason = result.finish_reason
                    break
                if len(tokens) >= budget:
                    tail = stopper.finish()
                    if tail and on_text is not None:
                        on_text(tail)
                    reason = "length"
                    break
                ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
                logits = self.forward(ids, self.cache.batch([slot], 1))
            t2 = time.perf_counter()
        finally:
            self.cache.free(slot)
        return GenerationResult(
            text=stopper.text,
            tokens=tokens,
            prompt_ids=prompt,
            finish_reason=reason,
            prefill_s=t_first - t0,
            decode_s=t2 - t_first,
        )
