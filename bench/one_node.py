"""The one node a room is compared with (bench/pipeline.py): the local engine in this process."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

PROMPT_LEN, LONG_PROMPT = 32, 512


class Local:
    """The one-node engine the rooms are compared with, in this process. On a CPU it stays loaded
    while the rooms run, so each room's round is paired with a local round right before it: this
    VM's speed drifts by 10-20% over minutes, and ratios of paired rounds drift less."""

    def __init__(self, model: Path, new_tokens: int, device: str, dtype: str, graphs: bool = False,
                 pin: bool = False) -> None:
        from peerpipe.engine.generate import LocalEngine
        from peerpipe.engine.sampling import SamplingParams

        self.pin, self.device = pin, device
        self.cores = os.sched_getaffinity(0)
        if pin:  # one core, one thread: what each pinned node of a room gets
            from peerpipe.compute import set_threads

            set_threads(1)
        self.engine, _ = LocalEngine.from_dir(
            model, device=device, dtype=dtype, max_seq=LONG_PROMPT + new_tokens + 1, cuda_graphs=graphs
        )
        self.params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        self.prompt = [10 + i % 200 for i in range(PROMPT_LEN)]
        self._pinned(lambda: self.engine.generate(self.prompt, self.params))

    def _pinned(self, fn):  # type: ignore[no-untyped-def]
        if self.pin:
            os.sched_setaffinity(0, {0})
        try:
            return fn()
        finally:  # the rooms' nodes (and this process's client) go where --pin puts them
            os.sched_setaffinity(0, self.cores)

    def decode_tok_s(self) -> float:
        return self._pinned(lambda: self.engine.generate(self.prompt, self.params)).tok_s

    def figures(self, repeats: int) -> dict:
        from peerpipe.engine.sampling import SamplingParams

        tok_s = statistics.median(self.decode_tok_s() for _ in range(repeats))
        long = [10 + i % 200 for i in range(LONG_PROMPT)]
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        self._pinned(lambda: self.engine.generate(long, one))
        ttft = statistics.median(self._pinned(lambda: self.engine.generate(long, one)).prefill_s for _ in range(repeats))
        return {"tok_s": tok_s, "ttft_s": ttft}

    def close(self) -> None:
        del self.engine  # the rooms that follow need this device's memory
        if self.device != "cpu":
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()


def local_baseline(
    model: Path, new_tokens: int, repeats: int, device: str, dtype: str, graphs: bool = False, pin: bool = False
) -> dict:
    local = Local(model, new_tokens, device, dtype, graphs, pin)
    try:
        return local.figures(repeats)
    finally:
        local.close()
