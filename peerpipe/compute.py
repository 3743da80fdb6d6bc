"""One thread for all of a process's tensor work.

PyTorch keeps a CPU thread pool (OpenMP team) per thread that runs operators. Two pools on few
cores slow each other down several times over (measured: a decode step of a small model took
1.2 ms from one thread, 3.5 ms once a second thread had run operators too). So benchmarks,
stage loading and forwards all run here, and the event loop stays free for the network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="peerpipe-compute")
_lock = threading.Lock()
_running = 0  # calls submitted and not yet finished (or cancelled)
_last: concurrent.futures.Future[object] | None = None  # the call submitted last


async def work_done() -> None:
    """Return once the compute thread has done the work submitted so far (at once when idle):
    what a poller for data this process's own compute will write waits for, instead of looking
    again and again, each look a wake-up that takes a core from the compute thread's team."""
    job = _last
    if job is None or job.done():
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake(_: concurrent.futures.Future[object]) -> None:
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    job.add_done_callback(wake)
    await done


def _finished(_: concurrent.futures.Future[object]) -> None:
    global _running
    with _lock:
        _running -= 1


async def run_compute(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` on the compute thread; the caller's event loop keeps running meanwhile."""
    global _running, _last
    with _lock:
        _running += 1
    job = _last = _executor.submit(functools.partial(fn, *args, **kwargs))
    # Counted down by the future itself, on the compute thread as the call returns (before the
    # next call starts, which step_aside relies on) or wherever a queued call is cancelled.
    job.add_done_callback(_finished)
    return await asyncio.wrap_future(job)


class SteppedAside(Exception):
    """A job that may wait (a re-measure while the room serves) gave the compute thread up to
    work that arrived behind it; the caller tries again later."""


def step_aside() -> None:
    """Raise :class:`SteppedAside` if other calls wait for the compute thread. Long jobs that may
    wait call it between their steps, so an answer's forward waits for one step, not for them."""
    if _running > 1:
        raise SteppedAside("work arrived for the compute thread")


def computing() -> bool:
    """Whether the compute thread has work (a thread spinning meanwhile would take the GIL from it)."""
    return _running > 0


def one_core() -> bool:
    """Whether this process may run on one core only: then the compute thread cannot run beside
    the event loop, and a short forward handed to it costs two thread hops for nothing."""
    return hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) == 1


def set_threads(count: int) -> None:
    """Give this process's tensor work ``count`` CPU threads. OpenMP keeps the setting per thread,
    so it is made on the compute thread (where forwards run) and on this one (a local engine)."""
    import torch

    if count < 1:
        raise ValueError(f"a node needs at least one thread, not {count}")
    torch.set_num_threads(count)
    _executor.submit(torch.set_num_threads, count).result()
