"""How the host's data plane sends its answers' steps: a lone answer's decode steps at once, steps
of answers running together (and prompts) as one compute-batch at the end of the loop's turn. The room node is replaced
by one that records what it is asked to send."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np

from peerpipe.inference.dataplane import DataPlane
from peerpipe.protocol import ComputeBatch, ComputeRequest, Message, Sampling, SessionSpec, TensorData


class Recorder:
    node_id, name = "host", "host"

    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []

    async def send(self, peer: str, message: Message, **_: Any) -> None:
        self.sent.append((peer, message))


def step(task: str, session: SessionSpec | None = None) -> ComputeRequest:
    return ComputeRequest(task, TensorData.from_numpy(np.array([[7]], dtype=np.int64)), task, 1, 5, session)


def test_a_lone_answers_step_goes_at_once_and_others_share_a_frame() -> None:
    node = Recorder()
    plane = DataPlane(node)  # type: ignore[arg-type]
    pipeline = SimpleNamespace(running=1)
    plane.entry = SimpleNamespace(pipeline=pipeline)  # type: ignore[assignment]

    async def main() -> None:
        sending = asyncio.ensure_future(plane.send_steps("stage-1", step("a")))
        await asyncio.sleep(0)  # one turn of the loop: the send ran, nothing was held back
        assert sending.done() and node.sent == [("stage-1", step("a"))]
        # A prompt waits for the turn's end even alone: answers started together come one by one.
        prompt = step("p", SessionSpec(Sampling()))
        sending = asyncio.ensure_future(plane.send_steps("stage-1", prompt))
        await asyncio.sleep(0)
        assert not sending.done()
        await sending
        assert node.sent[-1] == ("stage-1", prompt)
        node.sent.clear()
        pipeline.running = 3
        await asyncio.gather(*(plane.send_steps("stage-1", step(t)) for t in "bcd"))
        assert len(node.sent) == 1
        peer, batch = node.sent[0]
        assert peer == "stage-1" and isinstance(batch, ComputeBatch)
        assert [r.task_id for r in batch.requests] == ["b", "c", "d"]

    asyncio.run(main())
