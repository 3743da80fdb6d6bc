"""One fetch of many tensors from the room's holders: byte ranges cut into pieces on demand,
several in flight, each tensor checked against the manifest before it counts.

How hard it pulls depends on the holder. A holder that is passing answers' hidden states says
so (``WeightReply.busy``): then one small piece is in flight at a time, one every
``GENTLE_GAP_S`` at most, so a few milliseconds of weights at most sit in any queue ahead of an
answer's bytes and the fetch takes little of the holder's CPU; the answers run as if alone and
the fetch still advances. Otherwise several pieces
are in flight, each sized to ``FAST_PIECE_S`` of the link's measured rate, and as many more as
the round trip holds (``MAX_WINDOW`` at most): they fill the link however far the holder is, and
an answer that starts meanwhile finds at most ``WINDOW * FAST_PIECE_S`` of weights queued (what is
on its way is on the wire, not in a queue).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from peerpipe.logs import Report
from peerpipe.protocol import WeightReply, WeightRequest
from peerpipe.weights.errors import FetchError, HolderGone
from peerpipe.weights.manifest import TensorRecord
from peerpipe.weights.store import Store

if TYPE_CHECKING:
    from peerpipe.weights.gguf_store import GGUFStore

PIECE = 4 << 20  # the largest piece
FIRST_PIECE = 256 << 10  # until the link's rate is known
FAST_PIECE_S = 0.025
WINDOW = 4  # pieces in flight beyond what the round trip holds, when nobody is answering
MAX_WINDOW = 64
RATE_S = 0.1
GENTLE_PIECE = 32 << 10  # ~2.6 ms on a 100 Mbit/s link
GENTLE_WINDOW = 1
GENTLE_GAP_S = 0.02
Ask = Callable[[str, WeightRequest], Awaitable[WeightReply]]
T = TypeVar("T")


@dataclass
class _Tensor:
    record: TensorRecord
    left: int = 0  # bytes not yet written
    served_by: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)  # holders without it, or whose bytes were bad


async def in_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a thread that a cancel waits out: it writes the store, which the caller
    may hand to another process (or seal) as soon as it returns."""
    job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await asyncio.wait([job])
        raise


class Transfer:
    def __init__(
        self, store: Store | GGUFStore, todo: Sequence[TensorRecord], holders: Sequence[str], ask: Ask, stats, report: Report,  # type: ignore[no-untyped-def]
        on_bytes: Callable[[int], None],
    ) -> None:
        self.store, self.holders, self.ask, self.stats, self.report = store, list(holders), ask, stats, report
        self.on_bytes = on_bytes
        self.tensors = {t.name: _Tensor(t, t.nbytes) for t in todo}
        self.pending: deque[tuple[str, int, int]] = deque((t.name, 0, t.nbytes) for t in todo)
        self.remaining = len(todo)
        self.gone: set[str] = set()
        self.more = asyncio.Event()
        self.finished = asyncio.Event()
        self.gentle = False  # the last answer said its holder is passing answers' hidden states
        self.gentle_replies = 0
        self.received = 0
        self.started = time.monotonic()
        # (when, bytes) of recent pieces; bounded, as a busy holder's pieces are not pruned by _rate
        self.recent: deque[tuple[float, int]] = deque([(self.started, 0)], maxlen=4096)
        self.rtt_s = 0.0  # the quickest answer seen: the link's round trip, plus a piece's time on it
        self.window_changed = asyncio.Event()
        self.marking = asyncio.Lock()

    def _piece(self) -> int:
        if self.gentle:
            return min(PIECE, GENTLE_PIECE)
        if self.received < 8 * FIRST_PIECE:
            return min(PIECE, FIRST_PIECE)
        return min(PIECE, max(GENTLE_PIECE, int(self._rate() * FAST_PIECE_S)))

    def _rate(self) -> float:
        """Bytes a second over about a round trip (the whole fetch's average lags a rising rate,
        and the window grows once a round trip)."""
        now, span = time.monotonic(), max(RATE_S, 1.5 * self.rtt_s)
        while len(self.recent) > 1 and now - self.recent[1][0] >= span:
            self.recent.popleft()
        since = max(self.recent[0][0], now - span)
        return sum(n for _, n in self.recent) / max(now - since, 1e-3)

    def window(self) -> int:
        """Pieces in flight: one while a holder is busy, else ``WINDOW`` beyond the round trip's worth."""
        if self.gentle:
            return GENTLE_WINDOW
        return min(MAX_WINDOW, WINDOW + int(self.rtt_s / FAST_PIECE_S))

    def _answered(self, took_s: float, busy: bool) -> None:
        before = self.window()
        self.rtt_s = took_s if not self.rtt_s else min(self.rtt_s, took_s)
        self.gentle = busy
        if self.window() != before:
            self.window_changed.set()
            self.window_changed = asyncio.Event()  # waiters hold the one just set

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                workers = [tg.create_task(self._worker(i)) for i in range(MAX_WINDOW)]
                await self.finished.wait()
                for task in workers:
                    task.cancel()
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None

    def _holder_for(self, t: _Tensor) -> str:
        for holder in self.holders:
            if holder not in self.gone and holder not in t.refused:
                return holder
        raise FetchError(
            f"no peer has a good copy of {t.record.name} (asked {len(self.holders)}; "
            f"{len(self.gone)} left or stopped answering)"
        )

    def _put_back(self, item: tuple[str, int, int], front: bool = False) -> None:
        (self.pending.appendleft if front else self.pending.append)(item)
        self.more.set()

    async def _take(self, index: int) -> tuple[str, int, int]:
        while True:
            if index >= self.window():
                await self.window_changed.wait()
                continue
            if self.pending:
                name, offset, length = self.pending.popleft()
                size = self._piece()
                if length > size:
                    self._put_back((name, offset + size, length - size), front=True)
                    length = size
                return name, offset, length
            self.more.clear()
            await self.more.wait()

    async def _worker(self, index: int) -> None:
        while True:
            name, offset, length = await self._take(index)
            t = self.tensors[name]
            holder = self._holder_for(t)
            asked = time.monotonic()
            try:
                reply = await self.ask(holder, WeightRequest(0, self.store.manifest.id, name, offset, length))
            except HolderGone as exc:
                if holder not in self.gone:
                    self.gone.add(holder)
                    self.stats.holders_lost += 1
                    self.report(f"a peer sending weights is gone ({exc}); asking the next")
                self._put_back((name, offset, length), front=True)
                continue
            self._answered(time.monotonic() - asked, reply.busy)
            if reply.busy:
                self.gentle_replies += 1
                await asyncio.sleep(GENTLE_GAP_S)  # a pace, not a wait for an event: background traffic
            if reply.error or len(reply.data) != length:
                t.refused.add(holder)
                self._put_back((name, offset, length), front=True)
                continue
            self.store.write(name, offset, reply.data)
            self.stats.bytes_received += length
            self.received += length
            self.recent.append((time.monotonic(), length))
            self.on_bytes(length)
            t.served_by.add(holder)
            t.left -= length
            if not t.left:
                await self._verify(t)

    async def _verify(self, t: _Tensor) -> None:
        name = t.record.name
        if await asyncio.to_thread(self.store.matches, name):
            async with self.marking:  # one at a time: a group's list is read, added to, written
                await in_thread(self.store.mark_verified, name)  # (it syncs the disk: off the loop)
            self.remaining -= 1
            if not self.remaining:
                self.finished.set()
            return
        self.stats.bad_tensors += 1
        self.report(f"{name} did not match its hash: fetching it again from another peer")
        self.on_bytes(-t.record.nbytes)
        t.refused |= t.served_by
        t.served_by.clear()
        t.left = t.record.nbytes
        self._put_back((name, 0, t.record.nbytes))
