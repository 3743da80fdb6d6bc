"""How the host's data plane sends its answers' steps: a lone answer's at once, steps of answers
running together as one compute-batch at the end of the loop's turn. The room node is replaced
by one that records what it is asked to send."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np

from peerpipe.inference.dataplane import DataPlane
from peerpipe.protocol import ComputeBatch, ComputeRequest, Message, TensorData


class Recorder:
    node_id, name = "host", "host"

    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []

    async def send(self, peer: str, message: Message, **_: Any) -> None:
        self.sent.append((peer, message))


def step(task: str) -> ComputeRequest:
    return ComputeRequest(task, TensorData.from_numpy(np.array([[7]], dtype=np.int64)), task, 1, 5)


def test_a_lone_answer_sends_at_once_and_answers_together_share_a_frame() -> None:
    node = Recorder()
    plane = DataPlane(node)  # type: ignore[arg-type]
    pipeline = SimpleNamespace(running=1)
    plane.entry = SimpleNamespace(pipeline=pipeline)  # type: ignore[assignment]

    async def main() -> None:
        sending = asyncio.ensure_future(plane.send_steps("stage-1", step("a")))
        await asyncio.sleep(0)  # one turn of the loop: the send ran, nothing was held back
        assert sending.done() and node.sent == [("stage-1", step("a"))]
        pipeline.running = 3
        await asyncio.gather(*(plane.send_steps("stage-1", step(t)) for t in "bcd"))
        assert len(node.sent) == 2
        peer, batch = node.sent[1]
        assert peer == "stage-1" and isinstance(batch, ComputeBatch)
        assert [r.task_id for r in batch.requests] == ["b", "c", "d"]

    asyncio.run(main())
