"""Single-node generation: a whole model in one stage, prefill then a token-by-token decode loop."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from peerpipe.engine.cuda_graphs import GraphedDecoder
from peerpipe.engine.decode import Decoding, GenerationResult, OnText, check_prompt
from peerpipe.engine.kvcache import Batch
from peerpipe.engine.loader import LoadStats, ProgressFn, load_stage
from peerpipe.engine.model import Stage
from peerpipe.engine.sampling import Sampler, SamplingParams, make_generator
from peerpipe.engine.speculate import Drafts, verify
from peerpipe.engine.tokenizer import Tokenizer


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
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: OnText | None = None,
        *,
        drafts: Drafts | None = None,
    ) -> GenerationResult:
        """One answer; with ``drafts``, steps verify drafted tokens (the same tokens, fewer steps)."""
        prompt = list(prompt_ids)
        check_prompt(prompt, self.cache.max_seq)
        slot = self.cache.alloc()
        try:
            warmup_s = self._warm(slot, len(prompt), min(params.max_tokens, self.cache.max_seq - len(prompt)))
            decoding = Decoding(prompt, params, self.tokenizer, max_seq=self.cache.max_seq, on_text=on_text)
            generator = make_generator(params.seed, self.device) if not params.greedy else None
            history = list(decoding.prompt)  # the sampler's view, grown in place
            ids = torch.tensor([history], dtype=torch.long, device=self.device)
            logits = self.forward(ids, self.cache.batch([slot], len(history)))
            if drafts is None and params.repetition_penalty == 1.0:
                self._decode_ahead(slot, decoding, history, logits, generator)
                return self._result(decoding, warmup_s, drafts)
            tokens = [int(self._sampler.sample(logits, [params], [generator], [history], [len(history)])[0])]
            while self._push(decoding, history, tokens, drafts):
                if drafts is None:
                    ids = torch.tensor([[history[-1]]], dtype=torch.long, device=self.device)
                    logits = self.forward(ids, self.cache.batch([slot], 1))
                    tokens = [int(self._sampler.sample(logits, [params], [generator], [history], [len(history)])[0])]
                else:
                    tokens = self._drafted_step(slot, decoding, history, generator, drafts)
        finally:
            self.cache.free(slot)
        return self._result(decoding, warmup_s, drafts)

    @staticmethod
    def _result(decoding: Decoding, warmup_s: float, drafts: Drafts | None) -> GenerationResult:
        result = decoding.result()
        return dataclasses.replace(result, warmup_s=warmup_s, speculation=drafts.stats if drafts else None)

    def _decode_ahead(
        self, slot: int, decoding: Decoding, history: list[int], logits: torch.Tensor,
        generator: torch.Generator | None,
    ) -> None:
        """Decode with each step launched before the token of the step before it is read back, so
        the host's work between steps (streaming the text, checking stops, the next step's inputs)
        overlaps the device's instead of leaving it idle (on an H200, 0.3 ms of a 1B model's 1.7 ms
        token). The token feeds the next step where it was drawn, on the device. A step launched past
        a stop is forgotten: its cache position is rolled back. Draws happen in the same order, at
        the same positions, so answers equal a step-at-a-time decode's (a repetition penalty, which
        needs the history on the host, takes that path instead)."""
        params, cuda = decoding.params, self.device.type == "cuda"
        back = torch.empty(1, dtype=torch.long, pin_memory=cuda)
        ready = torch.cuda.Event() if cuda else None
        token = self._sampler.sample(logits, [params], [generator], [history], [len(history)]).view(1, 1)
        while True:
            back.copy_(token.view(1), non_blocking=cuda)
            if ready is not None:
                ready.record()
            ahead = None
            if len(decoding.tokens) + 1 < decoding.budget:  # the token in flight leaves room for another
                logits = self.forward(token, self.cache.batch([slot], 1))
                ahead = self._sampler.sample(logits, [params], [generator], [history], [len(history) + 1]).view(1, 1)
            if ready is not None:
                ready.synchronize()  # this token's copy only, not the step launched after it
            history.append(int(back[0]))
            if not decoding.push(history[-1]):
                if ahead is not None:
                    self.cache.rollback(slot, self.cache.lengths[slot] - 1)
                return
            assert ahead is not None  # the budget check above agrees with Decoding's
            token = ahead

    @staticmethod
    def _push(decoding: Decoding, history: list[int], tokens: list[int], drafts: Drafts | None = None) -> bool:
        for i, token in enumerate(tokens):  # a stop or the budget inside a kept block ends the answer there
            history.append(token)
            if not decoding.push(token):
                if drafts is not None and i + 1 < len(tokens):
                    drafts.unused(len(tokens) - i - 1)
                return False
        return True

    def _drafted_step(
        self, slot: int, decoding: Decoding, history: list[int], generator: torch.Generator | None, drafts: Drafts
    ) -> list[int]:
        """A step of the answer's last token and up to k drafts (engine/speculate.py)."""
        began = time.perf_counter()
        left = decoding.budget - len(decoding.tokens) - 1
        sent = drafts.propose(history, min(drafts.size.choose(), left, self.cache.max_seq - len(history)))
        start = len(history) - 1  # the last token's position: the cache holds everything before it
        ids = torch.tensor([[history[-1], *sent]], dtype=torch.long, device=self.device)
        batch = self.cache.batch([slot], ids.shape[1])
        if self._graphed is not None:
            rows = self._graphed(ids, batch)[0]
        else:
            rows = self.stage(ids, self.cache, batch, last_only=not sent)[0]
        kept = verify(self._sampler, rows[-len(sent) - 1 :], decoding.params, generator, history, sent, start + 1)
        self.cache.rollback(slot, start + len(kept))  # the last token and the kept drafts
        drafts.observe(sent, kept, time.perf_counter() - began)
        return kept

    def _warm(self, slot: int, prompt_len: int, budget: int) -> float:
        """Capture the decode graphs this answer needs before its clock starts; the seconds it took."""
        if self._graphed is None or budget < 2:
            return 0.0
        began = time.perf_counter()
        x = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._graphed.warm((slot,), range(prompt_len + 1, prompt_len + budget), x)
        return time.perf_counter() - began
