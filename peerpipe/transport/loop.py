"""The event loop peerpipe runs on (uvloop where it is installed, asyncio otherwise), and how it
keeps polling while answers are in flight."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import deque
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
# Polling ahead (CPU nodes on cores of their own): the poll starts this long, or this share of
# the expected wait if more, before the next input is due, and gives up as long after it. The
# timer that starts it fires on the millisecond at best, and its own wake-up costs what the poll
# saves the input: it must come early enough to be paid before the input lands.
AHEAD_LEAD_S = 0.002
AHEAD_SHARE = 0.15
AHEAD_GAPS = 8  # the expected wait: the median of this many last ones (and none before 3)


def busy_poll_window(device: str) -> float:
    """How long a node keeps polling after data-plane traffic: ``BUSY_POLL_S`` where its tensor
    work runs on a GPU (the CPU would idle anyway), 0 on CPU nodes (their cores compute);
    ``PEERPIPE_BUSY_POLL_MS`` overrides (0 turns it off)."""
    override = os.environ.get("PEERPIPE_BUSY_POLL_MS", "")
    if override:
        return max(0.0, float(override)) / 1e3
    return BUSY_POLL_S if device.startswith("cuda") else 0.0


def polls_ahead(device: str, cores: set[int] | None = None, machine: int | None = None) -> bool:
    """Whether a node polls just before its next input is due (``BusyPoll(ahead=True)``): a CPU
    node whose process was given some of the machine's cores, not all (``taskset``, a container's
    CPU set), which it then takes to be its own; a node on every core may share them with a
    neighbour that computes, and a poll there would take that neighbour's time.
    ``PEERPIPE_POLL_AHEAD`` (1 or 0) overrides."""
    override = os.environ.get("PEERPIPE_POLL_AHEAD", "")
    if override:
        return override not in ("0", "false", "no", "off")
    if device != "cpu" or not hasattr(os, "sched_getaffinity"):
        return False
    cores = os.sched_getaffinity(0) if cores is None else cores
    machine = (os.cpu_count() or 1) if machine is None else machine
    return len(cores) < machine


class BusyPoll:
    """Keeps the event loop polling its sockets while a step's input or reply is due.

    A sleeping thread woken by a packet costs a wake-up of an idle CPU, which in a virtual
    machine takes hundreds of microseconds: twice per hop, every token. While polling, the loop
    instead runs a task that yields at once, so it checks its sockets without blocking and a
    message is read the moment it lands.

    Two ways to choose when. A window (GPU nodes): after each ``touch()`` (any data-plane
    traffic), for ``window_s``; the CPU would idle meanwhile anyway. Ahead (``ahead=True``, CPU
    nodes on cores of their own): after the node sends (``sent()``) it sleeps until shortly
    before its next input is due, by the median of its last waits from a send to the next input
    (``arrived()``), then polls until the input comes or is well overdue. Like a disk driver's
    hybrid polling: the wake-up is paid while nothing waits for it, and the core spins for a
    few milliseconds a token rather than for the whole wait.
    """

    def __init__(
        self, window_s: float, clock: Callable[[], float] = time.monotonic, pause: Callable[[], bool] = lambda: False,
        *, ahead: bool = False,
    ) -> None:
        self.window_s = window_s
        self.ahead = ahead
        self.clock = clock
        # While pause() holds (another thread of this process computes), the loop sleeps as usual:
        # a spinning thread would keep taking the GIL that thread needs for every operation.
        self.pause = pause
        self.until = 0.0
        self.spins = 0  # loop iterations spent polling (for tests and logs)
        self._wake = asyncio.Event()
        self._gaps: deque[float] = deque(maxlen=AHEAD_GAPS)
        self._idle_since: float | None = None  # the last send, while no input has come since
        self._timer: asyncio.TimerHandle | None = None

    @property
    def polls(self) -> bool:
        return self.ahead or self.window_s > 0

    def touch(self) -> None:
        """Data-plane traffic (a window poll starts over from now)."""
        if self.window_s > 0 and not self.ahead:
            self._poll_until(self.clock() + self.window_s)

    def sent(self) -> None:
        """The node sent a step on to another: its next input is due in about the usual wait."""
        if not self.ahead:
            return self.touch()
        now = self._idle_since = self.clock()
        expected = self.expected_s()
        if expected is None:
            return
        lead = max(AHEAD_LEAD_S, AHEAD_SHARE * expected)
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, expected - lead), self._poll_until, now + expected + lead)

    def arrived(self) -> None:
        """An input came from another node: the wait since the last send is learned, and an ahead
        poll stops."""
        if not self.ahead:
            return self.touch()
        if self._idle_since is not None:
            self._gaps.append(self.clock() - self._idle_since)
            self._idle_since = None
        self._cancel_timer()
        self.until = 0.0

    def expected_s(self) -> float | None:
        """The usual wait from a send to the next input, once three have been seen."""
        return statistics.median(self._gaps) if len(self._gaps) >= 3 else None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _poll_until(self, until: float) -> None:
        self._timer = None
        self.until = until
        if not self._wake.is_set():
            self._wake.set()

    async def run(self) -> None:
        if not self.polls:
            return
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self.clock() < self.until:
                    if self.pause():
                        if self.ahead:
                            # Its core computes, so an input wakes no idle CPU: nothing to save.
                            self.until = 0.0
                            break
                        await asyncio.sleep(PAUSED_S)
                        continue
                    self.spins += 1
                    await asyncio.sleep(0)
        finally:
            self._cancel_timer()
