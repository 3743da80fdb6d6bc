"""Two stage servers driven by hand, step by step (no room around them): the prompts of three
answers, then decode rounds of some of them at once."""

from __future__ import annotations

import numpy as np
import torch

from peerpipe.engine.loader import load_stage
from peerpipe.inference.gpu_rows import rows_written
from peerpipe.inference.stage_server import StageServer
from peerpipe.inference.wire import release_shared, row_bytes, to_wire
from peerpipe.protocol import ComputeBatch, ComputeRequest, ComputeResult, Message


def servers(
    path, lean: bool = True, wire: str = "", device: str = "cuda"  # type: ignore[no-untyped-def]
) -> tuple[StageServer, StageServer, list[tuple[str, Message]]]:
    """Two stages of a 4-layer model, [0, 2) and [2, 4), and what they send (kept in a list)."""
    sent: list[tuple[str, Message]] = []

    async def send(node: str, message: Message) -> None:
        sent.append((node, message))

    made = []
    for start, end, hop in ((0, 2, "b"), (2, 4, None)):
        stage, _ = load_stage(path, start, end, device=device, dtype="float32")
        server = StageServer(
            stage, stage.new_cache(4, 128), label=f"[{start},{end})", next_hop=hop, host_id="h", send=send, wire=wire
        )
        server.warm()
        if not lean:
            server._lean = lambda data: False  # type: ignore[method-assign]
        made.append(server)
    return made[0], made[1], sent


def steps_in(sent: list[tuple[str, Message]]) -> list:
    """The steps a stage sent, a compute-batch's one by one."""
    steps: list = []
    for _, message in sent:
        steps += [*message.requests, *message.results] if isinstance(message, ComputeBatch) else [message]
    return steps


async def steps(first: StageServer, last: StageServer, sent: list[tuple[str, Message]], counts: list[int]) -> list:
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
            hidden = steps_in(sent)
            if all(m.input_tensor.encoding == "raw" for m in hidden):  # a shared one is read once, by the stage
                outputs += [bytes(m.input_tensor.data) for m in hidden]
            sent.clear()
            await last._run(hidden)  # type: ignore[arg-type]
            for result in steps_in(sent):
                assert isinstance(result, ComputeResult)
                token = await token_of(result)
                tokens[result.task_id].append(token)
                outputs.append(token)
    return outputs


AHEAD: list[int] = []  # positions of the results that came ahead of their computation


async def token_of(result: ComputeResult) -> int:
    """A result's token: inline, or sent ahead through shared memory (inference/tokens_ahead.py),
    read once written; its copy for the first stage is given back."""
    if result.ahead is None:
        return int(result.output_tensor.to_numpy().reshape(-1)[0])
    AHEAD.append(result.start_pos)
    await rows_written([result.output_tensor, result.ahead])
    release_shared(result.ahead)
    return int(np.frombuffer(row_bytes(result.output_tensor), dtype="<i8")[0])
