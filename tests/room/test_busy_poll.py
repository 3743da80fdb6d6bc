"""The event loop polls (never sleeps in the kernel) for a window after data-plane traffic on GPU
nodes, and just before the next input is due on CPU nodes given cores of their own; it goes back
to sleeping once the window has passed or the input has come."""

from __future__ import annotations

import asyncio

import pytest

from peerpipe.transport.loop import (
    AHEAD_LEAD_S,
    AHEAD_SHARE,
    BUSY_POLL_S,
    BusyPoll,
    busy_poll_window,
    polls_ahead,
)


async def _turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_polls_only_within_the_window_after_a_touch() -> None:
    now = [100.0]

    async def main() -> None:
        poll = BusyPoll(0.02, clock=lambda: now[0])
        task = asyncio.create_task(poll.run())
        await _turns(20)
        assert poll.spins == 0  # nothing in flight: the loop may sleep
        poll.touch()
        await _turns(20)
        assert poll.spins >= 15  # every turn of the loop polls
        now[0] += 0.01
        poll.touch()  # traffic again: the window starts over from now
        now[0] += 0.015
        before = poll.spins
        await _turns(10)
        assert poll.spins > before  # still inside the renewed window
        now[0] += 0.006
        await _turns(2)
        stopped = poll.spins
        await _turns(20)
        assert poll.spins == stopped  # past it: waiting for the next touch, not spinning
        poll.touch()
        await _turns(5)
        assert poll.spins > stopped
        task.cancel()

    asyncio.run(main())


def test_no_spinning_while_another_thread_computes() -> None:
    """A prompt's forward on the compute thread needs the GIL for every operation: while one runs,
    the loop sleeps as usual, and polls again once it is done."""
    computing = [True]

    async def main() -> None:
        poll = BusyPoll(60.0, pause=lambda: computing[0])
        task = asyncio.create_task(poll.run())
        poll.touch()
        await _turns(20)
        assert poll.spins == 0
        computing[0] = False
        async with asyncio.timeout(5):  # the paused poll looks again within PAUSED_S
            while poll.spins < 5:
                await asyncio.sleep(0)
        task.cancel()

    asyncio.run(main())


def test_a_zero_window_never_polls() -> None:
    async def main() -> None:
        poll = BusyPoll(0.0)
        poll.touch()
        await asyncio.wait_for(poll.run(), 1)  # returns at once: nothing to run
        assert poll.spins == 0 and poll.until == 0.0

    asyncio.run(main())


@pytest.mark.parametrize(
    ("device", "override", "window"),
    [("cuda", "", BUSY_POLL_S), ("cuda:1", "", BUSY_POLL_S), ("cpu", "", 0.0), ("webgpu", "", 0.0),
     ("cpu", "5", 0.005), ("cuda", "0", 0.0)],
)
def test_the_window_follows_the_device_unless_overridden(
    monkeypatch: pytest.MonkeyPatch, device: str, override: str, window: float
) -> None:
    monkeypatch.setenv("PEERPIPE_BUSY_POLL_MS", override)
    assert busy_poll_window(device) == pytest.approx(window)


async def _polling(poll: BusyPoll) -> None:
    """Until the poll spins (its timer has fired)."""
    async with asyncio.timeout(5):
        while poll.spins == 0:
            await asyncio.sleep(0)


async def _stays_still(poll: BusyPoll) -> None:
    """The poll spins no more while the loop turns."""
    stopped = poll.spins
    await _turns(20)
    assert poll.spins == stopped


def _learned(poll: BusyPoll, now: list[float], wait_s: float) -> None:
    for _ in range(3):  # three sends, each answered ``wait_s`` later
        poll.sent()
        now[0] += wait_s
        poll.arrived()


def test_polls_ahead_of_the_usual_wait_and_stops_when_the_input_comes() -> None:
    now = [0.0]

    async def main() -> None:
        poll = BusyPoll(0.0, clock=lambda: now[0], ahead=True)
        task = asyncio.create_task(poll.run())
        poll.sent()
        await _turns(20)
        assert poll.spins == 0  # no wait learned yet: nothing to poll ahead of
        now[0] += 0.05
        poll.arrived()
        _learned(poll, now, 0.05)
        assert poll.expected_s() == pytest.approx(0.05)
        loop = asyncio.get_running_loop()
        began = loop.time()
        poll.sent()
        await _turns(20)
        assert poll.spins == 0  # the input is not due for a while: the loop sleeps
        await _polling(poll)
        lead = max(AHEAD_LEAD_S, AHEAD_SHARE * 0.05)
        assert loop.time() - began >= 0.05 - lead - 0.002  # (the loop's timers round to a millisecond)
        poll.arrived()  # the input: polling stops at once
        await _stays_still(poll)
        task.cancel()

    asyncio.run(main())


def test_an_overdue_input_is_awaited_asleep() -> None:
    now = [0.0]

    async def main() -> None:
        poll = BusyPoll(0.0, clock=lambda: now[0], ahead=True)
        task = asyncio.create_task(poll.run())
        _learned(poll, now, 0.01)
        poll.sent()  # due in 10 ms: polls from 2 ms before
        await _polling(poll)
        now[0] += 0.01 + AHEAD_LEAD_S * 1.01  # well past due, nothing came
        await _turns(2)
        await _stays_still(poll)
        task.cancel()

    asyncio.run(main())


def test_a_window_poll_starts_on_sends_and_inputs_alike() -> None:
    async def main() -> None:
        for event in ("sent", "arrived"):
            poll = BusyPoll(60.0)
            task = asyncio.create_task(poll.run())
            getattr(poll, event)()
            await _turns(10)
            assert poll.spins >= 5
            task.cancel()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("device", "cores", "machine", "override", "ahead"),
    [("cpu", {0}, 2, "", True), ("cpu", {2, 3}, 8, "", True), ("cpu", {0, 1}, 2, "", False),
     ("cuda", {0}, 2, "", False), ("cpu", {0, 1}, 2, "1", True), ("cpu", {0}, 2, "0", False)],
)
def test_cpu_nodes_on_cores_of_their_own_poll_ahead(
    monkeypatch: pytest.MonkeyPatch, device: str, cores: set[int], machine: int, override: str, ahead: bool
) -> None:
    monkeypatch.setenv("PEERPIPE_POLL_AHEAD", override)
    assert polls_ahead(device, cores, machine) is ahead


def test_an_ahead_poll_ends_while_the_node_computes() -> None:
    """On a core of its own the compute thread is what a poll would take time from, and an input
    arriving meanwhile wakes no idle CPU."""
    now, computing = [0.0], [False]

    async def main() -> None:
        poll = BusyPoll(0.0, clock=lambda: now[0], pause=lambda: computing[0], ahead=True)
        task = asyncio.create_task(poll.run())
        _learned(poll, now, 0.001)
        poll.sent()
        await _polling(poll)
        computing[0] = True
        await _turns(3)
        assert poll.until == 0.0
        stopped = poll.spins
        computing[0] = False
        await _turns(20)
        assert poll.spins == stopped  # not again before the next send
        task.cancel()

    asyncio.run(main())
