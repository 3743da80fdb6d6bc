"""A GPU stage's lean decode step (inputs from the frames' bytes to the device through pinned
memory, outputs off it the same way) against the tensor path, on CUDA only:
``python -m pytest tests/inference/test_stage_cuda.py``."""

from __future__ import annotations

import asyncio

import pytest
import torch

from peerpipe.engine.loader import load_stage
from peerpipe.inference.stage_server import StageServer
from peerpipe.inference.wire import to_wire
from peerpipe.protocol import ComputeBatch, ComputeRequest, ComputeResult, Message

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _servers(path, lean: bool, wire: str = "") -> tuple[StageServer, StageServer, list[tuple[str, Message]]]:  # type: ignore[no-untyped-def]
    sent: list[tuple[str, Message]] = []

    async def send(node: str, message: Message) -> None:
        sent.append((node, message))

    servers = []
    for start, end, hop in ((0, 2, "b"), (2, 4, None)):
        stage, _ = load_stage(path, start, end, device="cuda", dtype="float32")
        server = StageServer(
            stage, stage.new_cache(4, 128), label=f"[{start},{end})", next_hop=hop, host_id="h", send=send, wire=wire
        )
        server.warm()
        if not lean:
            server._lean = lambda data: False  # type: ignore[method-assign]
        servers.append(server)
    return servers[0], servers[1], sent


def _steps_in(sent: list[tuple[str, Message]]) -> list:
    """The steps a stage sent, a compute-batch's one by one."""
    steps: list = []
    for _, message in sent:
        steps += [*message.requests, *message.results] if isinstance(message, ComputeBatch) else [message]
    return steps


async def _steps(first: StageServer, last: StageServer, sent: list[tuple[str, Message]], counts: list[int]) -> list:
    """Three answers' prompts, then decode rounds of ``counts`` of them at once; every output."""
    outputs = []
    tokens = {f"t{i}": [5 + i, 9, 14 + i] for i in range(3)}
    position = {t: 0 for t in tokens}
    for n in [None, *counts]:
        batch = list(tokens) if n is None else list(tokens)[:n]
        requests = []
        for task in batch:
            ids = tokens[task] if n is None else tokens[task][-1:]
            requests.append(ComputeRequest(task, to_wire(torch.tensor([ids], dtype=torch.long)), task, 1, position[task]))
            position[task] += len(ids)
        for r in requests if n is None else [requests]:  # prompts run alone, decode steps together
            sent.clear()
            await first._run(r if isinstance(r, list) else [r])
            hidden = _steps_in(sent)
            if all(m.input_tensor.encoding == "raw" for m in hidden):  # a shared one is read once, by the stage
                outputs += [bytes(m.input_tensor.data) for m in hidden]
            sent.clear()
            await last._run(hidden)  # type: ignore[arg-type]
            for result in _steps_in(sent):
                assert isinstance(result, ComputeResult)
                token = int(result.output_tensor.to_numpy().reshape(-1)[0])
                tokens[result.task_id].append(token)
                outputs.append(token)
    return outputs


def test_a_lean_decode_step_equals_the_tensor_path(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_model_dir("llama")
    calls = []
    real = StageServer._forward_tensors

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(self.label)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StageServer, "_forward_tensors", counted)
    counts = [1, 3, 2, 3, 1, 1]  # alone (its slot's own graph), padded batches of 2 and 4 rows
    lean = asyncio.run(_steps(*_servers(path, lean=True), counts))
    took_tensors = len(calls)
    assert took_tensors == 6  # the three prompts, on both stages; every decode step went lean
    plain = asyncio.run(_steps(*_servers(path, lean=False), counts))
    assert len(calls) > took_tensors
    assert lean == plain


def test_hidden_states_through_shared_memory_take_the_lean_path_too(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_model_dir("llama")
    calls = []
    real = StageServer._forward_tensors
    monkeypatch.setattr(StageServer, "_forward_tensors", lambda self, *a: calls.append(1) or real(self, *a))
    counts = [1, 3, 2, 1]
    shared = asyncio.run(_steps(*_servers(path, lean=True, wire="local"), counts))
    assert len(calls) == 6  # the prompts alone
    inline = asyncio.run(_steps(*_servers(path, lean=True), counts))
    tokens = [x for x in inline if isinstance(x, int)]  # the inline run also lists its hidden states
    assert shared == tokens and len(tokens) == 3 + sum(counts)


def test_one_answers_rows_leave_before_the_gpu_has_run_them(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_model_dir("llama")
    counts = [1, 1, 3, 1, 1]
    first, last, sent = _servers(path, lean=True, wire="local")
    early = asyncio.run(_steps(first, last, sent, counts))
    assert first._writer is not None  # the ring's pages took CUDA's registration
    first._writer.close()
    # Each one-answer step was timed by the GPU (the last, perhaps, not collected yet) and the
    # batch of three on the host's clock.
    assert len(counts) - 1 <= first.stats.steps <= len(counts)
    monkeypatch.setenv("PEERPIPE_EARLY_ROWS", "0")
    first_waited, last_waited, sent_waited = _servers(path, lean=True, wire="local")
    waited = asyncio.run(_steps(first_waited, last_waited, sent_waited, counts))
    assert first_waited._writer is None
    assert early == waited and len(early) == 3 + sum(counts)
