"""The compute thread's count of calls (peerpipe/compute.py), which step_aside reads: a call sees
the calls queued behind it, never one that already finished."""

from __future__ import annotations

import asyncio
import threading

import pytest

from peerpipe.compute import SteppedAside, computing, run_compute, step_aside


def test_a_call_steps_aside_only_for_calls_queued_behind_it() -> None:
    async def main() -> None:
        gate = threading.Event()
        first = asyncio.ensure_future(run_compute(gate.wait))
        await asyncio.sleep(0)  # on the compute thread before the next is queued
        second = asyncio.ensure_future(run_compute(step_aside))
        await asyncio.sleep(0)
        assert computing()
        gate.set()
        await first
        await second  # the first had finished when it started: nothing waited behind it

        gate.clear()
        blocked = asyncio.ensure_future(run_compute(lambda: (gate.wait(), step_aside())))
        await asyncio.sleep(0)
        behind = asyncio.ensure_future(run_compute(int, "7"))
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(SteppedAside):
            await blocked
        assert await behind == 7
        assert not computing()

    asyncio.run(main())


def test_a_cancelled_queued_call_is_not_counted() -> None:
    async def main() -> None:
        gate = threading.Event()
        first = asyncio.ensure_future(run_compute(gate.wait))
        await asyncio.sleep(0)
        queued = asyncio.ensure_future(run_compute(int, "1"))
        await asyncio.sleep(0)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        probe = asyncio.ensure_future(run_compute(lambda: (gate.wait(), step_aside())))
        await asyncio.sleep(0)
        gate.set()
        await first
        await probe  # the cancelled call never ran and no longer counts
        assert not computing()

    asyncio.run(main())


def test_a_cpu_poller_waits_for_the_compute_threads_work_without_looking_again() -> None:
    """A poller for what this process's compute thread will write (a CPU stage's token ahead,
    read by the host of a room of one) waits for that work instead of waking every half
    millisecond: each wake-up took a core from the compute thread's team, and a tiny model's
    steps went from 2 to 290 ms."""
    from peerpipe.compute import work_done
    from peerpipe.inference.gpu_rows import pause

    async def main() -> None:
        gate, looked = threading.Event(), []
        job = asyncio.ensure_future(run_compute(gate.wait))
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(pause(True))
        asyncio.get_running_loop().call_later(0.05, gate.set)
        await asyncio.sleep(0.02)
        looked.append(waiting.done())  # still waiting: the work is not done
        await waiting
        assert looked == [False] and gate.is_set() and not computing()
        await job
        await asyncio.wait_for(work_done(), 1)  # idle: at once

    asyncio.run(asyncio.wait_for(main(), 10))
