"""The event loop peerpipe runs on (uvloop where it is installed, asyncio otherwise), and how it
keeps polling while answers are in flight."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def install_event_loop() -> bool:
    """Make new event loops uvloop ones when uvloop is installed; returns whether it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """``asyncio.run`` on uvloop when it is installed (and wanted; ``PEERPIPE_EVENT_LOOP=asyncio``
    says not)."""
    if use_uvloop and os.environ.get("PEERPIPE_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


BUSY_POLL_S = 0.02  # on GPU nodes: longer than a decode step of most models a stage holds
PAUSED_S = 0.0005  # how often a paused poll looks again


def busy_poll_window(device: str) -> float:
    """How long a node keeps polling after data-plane traffic: ``BUSY_POLL_S`` where its tensor
    work runs on a GPU (the CPU would idle anyway), 0 on CPU nodes (their cores compute);
    ``PEERPIPE_BUSY_POLL_MS`` overrides (0 turns it off)."""
    override = os.environ.get("PEERPIPE_BUSY_POLL_MS", "")
    if override:
        return max(0.0, float(override)) / 1e3
    return BUSY_POLL_S if device.startswith("cuda") else 0.0


class BusyPoll:
    """Keeps the event loop polling its sockets for ``window_s`` after each ``touch()``.

    A sleeping thread woken by a packet costs a wake-up of an idle CPU, which in a virtual
    machine takes hundreds of microseconds: twice per hop, every token. While a step is in
    flight the loop instead runs a task that yields at once, so the loop checks its sockets
    without blocking and a reply is read the moment it lands. Past the window it sleeps again.
    """

    def __init__(
        self, window_s: float, clock: Callable[[], float] = time.monotonic, pause: Callable[[], bool] = lambda: False
    ) -> None:
        self.window_s = window_s
        self.clock = clock
        # While pause() holds (another thread of this process computes), the loop sleeps as usual:
        # a spinning thread would keep taking the GIL that thread needs for every operation.
        self.pause = pause
        self.until = 0.0
        self.spins = 0  # loop iterations spent polling (for tests and logs)
        self._wake = asyncio.Event()

    def touch(self) -> None:
        if self.window_s > 0:
            self.until = self.clock() + self.window_s
            if not self._wake.is_set():
                self._wake.set()

    async def run(self) -> None:
        if self.window_s <= 0:
            return
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.clock() < self.until:
                if self.pause():
                    await asyncio.sleep(PAUSED_S)
                    continue
                self.spins += 1
                await asyncio.sleep(0)
