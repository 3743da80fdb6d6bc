"""How long an answer paused by a lost stage waits for the room's next plan (inference/pipeline.py
``_wait_plan``), with the pipeline's own state: no stages, no network."""

from __future__ import annotations

import asyncio

import pytest

from peerpipe.inference.errors import TaskFailedError
from peerpipe.inference.pipeline import Pipeline, Timeouts
from peerpipe.inference.tasks import Task
from peerpipe.models import default_model_dir
from peerpipe.protocol import Plan, PlanStage


def _pipeline(rejoin_s: float) -> Pipeline:
    from peerpipe.engine.tokenizer import Tokenizer

    async def send(peer: str, message: object) -> None:
        raise AssertionError("nothing is sent while an answer waits for a plan")

    return Pipeline(
        host_id="h", send=send, tokenizer=Tokenizer.from_dir(default_model_dir()), sessions=2, max_seq=64,  # type: ignore[arg-type]
        timeouts=Timeouts(recover_s=10.0, rejoin_s=rejoin_s),
    )


PLAN = Plan(2, "austen", 6, (PlanStage("h", 0, 6, 1.0),), 1.0)


def _answer(tokens: list[int]) -> Task:
    task = Task("t", 5)
    task.tokens = tokens
    return task


def test_an_answer_under_way_waits_out_the_grace_and_a_new_one_is_told_at_once() -> None:
    async def main() -> None:
        pipeline = _pipeline(rejoin_s=0.3)
        pipeline.cannot_plan("cannot plan austen: 19.69 MiB missing")
        with pytest.raises(TaskFailedError, match="cannot hold the model now"):
            await asyncio.wait_for(pipeline._wait_plan(_answer([]), 10.0), 0.1)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TaskFailedError, match=r"19\.69 MiB missing"):
            await pipeline._wait_plan(_answer([7, 8]), 10.0)
        assert asyncio.get_running_loop().time() - started >= 0.25

    asyncio.run(main())


def test_a_plan_on_its_way_ends_the_grace_however_long_it_loads() -> None:
    async def main() -> None:
        pipeline = _pipeline(rejoin_s=0.2)
        pipeline.cannot_plan("cannot plan austen")
        waiting = asyncio.create_task(pipeline._wait_plan(_answer([7]), 10.0))
        await asyncio.sleep(0.1)
        pipeline.cannot_plan("")  # a node came back: a plan is made and goes out to load
        await asyncio.sleep(0.4)  # longer than the grace: the stages are loading
        assert not waiting.done()
        pipeline.use_plan(PLAN, {"h": "h"})
        assert await asyncio.wait_for(waiting, 1.0) == PLAN

    asyncio.run(main())
