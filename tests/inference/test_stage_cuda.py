"""A GPU stage's lean decode step (inputs from the frames' bytes to the device through pinned
memory, outputs off it the same way) against the tensor path, on CUDA only:
``python -m pytest tests/inference/test_stage_cuda.py``."""

from __future__ import annotations

import asyncio

import pytest
import torch

from peerpipe.inference.stage_server import StageServer
from tests.inference import stage_steps
from tests.inference.stage_steps import servers, steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_lean_decode_step_equals_the_tensor_path(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_model_dir("llama")
    calls = []
    real = StageServer._forward_tensors

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(self.label)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StageServer, "_forward_tensors", counted)
    counts = [1, 3, 2, 3, 1, 1]  # alone (its slot's own graph), padded batches of 2 and 4 rows
    lean = asyncio.run(steps(*servers(path, lean=True), counts))
    took_tensors = len(calls)
    assert took_tensors == 6  # the three prompts, on both stages; every decode step went lean
    plain = asyncio.run(steps(*servers(path, lean=False), counts))
    assert len(calls) > took_tensors
    assert lean == plain


def test_hidden_states_through_shared_memory_take_the_lean_path_too(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_model_dir("llama")
    calls = []
    real = StageServer._forward_tensors
    monkeypatch.setattr(StageServer, "_forward_tensors", lambda self, *a: calls.append(1) or real(self, *a))
    counts = [1, 3, 2, 1]
    shared = asyncio.run(steps(*servers(path, lean=True, wire="local"), counts))
    assert len(calls) == 6  # the prompts alone
    inline = asyncio.run(steps(*servers(path, lean=True), counts))
    tokens = [x for x in inline if isinstance(x, int)]  # the inline run also lists its hidden states
    assert shared == tokens and len(tokens) == 3 + sum(counts)


def test_one_answers_rows_leave_before_the_gpu_has_run_them(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_model_dir("llama")
    counts = [1, 1, 3, 1, 1]
    monkeypatch.setenv("PEERPIPE_TOKENS_AHEAD", "auto")  # (from GPU stages)
    stage_steps.AHEAD.clear()
    first, last, sent = servers(path, lean=True, wire="local")
    early = asyncio.run(steps(first, last, sent, counts))
    assert first._writer is not None  # the ring's pages took CUDA's registration
    first._writer.close()
    # Each one-answer step was timed by the GPU (the last, perhaps, not collected yet) and the
    # batch of three on the host's clock.
    assert len(counts) - 1 <= first.stats.steps <= len(counts)
    # The last stage (wire "local": host and first stage share its memory) sent each lone
    # answer's token ahead of its computation, and no batch's.
    assert len(stage_steps.AHEAD) == len(counts) - 1
    monkeypatch.setenv("PEERPIPE_EARLY_ROWS", "0")
    monkeypatch.setenv("PEERPIPE_TOKENS_AHEAD", "0")
    stage_steps.AHEAD.clear()
    first_waited, last_waited, sent_waited = servers(path, lean=True, wire="local")
    waited = asyncio.run(steps(first_waited, last_waited, sent_waited, counts))
    assert first_waited._writer is None and not stage_steps.AHEAD
    assert early == waited and len(early) == 3 + sum(counts)
