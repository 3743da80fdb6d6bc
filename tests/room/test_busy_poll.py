"""The event loop polls (never sleeps in the kernel) for a window after data-plane traffic, on GPU
nodes only, and goes back to sleeping once the window has passed."""

from __future__ import annotations

import asyncio

import pytest

from peerpipe.transport.loop import BUSY_POLL_S, BusyPoll, busy_poll_window


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
