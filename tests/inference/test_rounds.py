"""Answers on stages that share one device go in step (inference/rounds.py): a decode step waits
for the other answers' steps in flight, all waiting steps go in one turn of the loop once the
last lands, and a step that never lands holds nobody for long."""

from __future__ import annotations

import asyncio

from peerpipe.inference.rounds import Rounds


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_step_alone_goes_at_once() -> None:
    async def main() -> int:
        rounds = Rounds()
        rounds.sent("a")
        await rounds.join("a")  # only its own step (a replay) is in flight
        rounds.landed("a")
        await rounds.join("a")
        return rounds.held

    assert asyncio.run(main()) == 0


def test_steps_wait_for_the_last_in_flight_and_go_together() -> None:
    async def main() -> list[str]:
        rounds = Rounds()
        rounds.step_s = 60.0  # long: only the landing may release them
        order: list[str] = []
        for task in "abc":
            rounds.sent(task)

        async def answer(task: str) -> None:
            rounds.landed(task)
            await rounds.join(task)
            order.append(task)

        waiting = [asyncio.create_task(answer(t)) for t in "ab"]
        await _turns(5)
        assert order == []  # c is still in flight
        rounds.landed("c")
        order.append("c landed")
        await asyncio.gather(*waiting)
        assert rounds.held == 2
        return order

    assert asyncio.run(main()) == ["c landed", "a", "b"]


def test_a_step_that_never_lands_holds_the_others_about_two_steps() -> None:
    async def main() -> tuple[float, int]:
        rounds = Rounds()
        rounds.sent("slow")
        rounds.sent("a")
        rounds.landed("a")  # its step took a moment: the wait is twice that, at least 1 ms
        loop = asyncio.get_running_loop()
        began = loop.time()
        await rounds.join("a")
        return loop.time() - began, rounds.held

    waited, held = asyncio.run(main())
    assert held == 1
    assert 0.0009 <= waited < 0.5  # not the 5 s cap: the wait scales with the steps


def test_steps_sent_after_an_answers_token_came_are_its_round() -> None:
    async def main() -> int:
        rounds = Rounds()
        rounds.step_s = 60.0
        rounds.sent("a")
        rounds.sent("b")
        rounds.landed("a")
        rounds.landed("b")  # one compute-batch brought both tokens
        await rounds.join("b")
        rounds.sent("b")  # b's next step goes first...
        await rounds.join("a")  # ...and does not hold a, whose token came with b's
        rounds.forget("a")
        rounds.forget("b")
        return rounds.held

    assert asyncio.run(main()) == 0
