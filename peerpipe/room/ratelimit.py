"""Slow down addresses that keep failing the handshake, so codes cannot be guessed quickly.

Each failed handshake from an address (a wrong code is the usual cause) raises its
count; the next handshake from it waits ``base * 2**(failures - free - 1)`` seconds,
capped, before we answer. The first ``free`` mistakes cost nothing, since people
mistype. A success forgets the address, and so does ``forget_after`` quiet seconds.
The clock is passed in, so tests need no sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Record:
    failures: int
    last: float


@dataclass
class FailureLimiter:
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    free_failures: int = 1
    forget_after_s: float = 600.0
    max_tracked: int = 4096
    # Guesses spread over many addresses (a botnet, an IPv6 prefix) meet a room-wide budget:
    # past it every handshake waits, so a code can't be brute-forced from many places at once.
    room_free_failures: int = 16
    clock: Callable[[], float] = time.monotonic
    _records: dict[str, _Record] = field(default_factory=dict, init=False, repr=False)
    _room: _Record = field(default_factory=lambda: _Record(0, 0.0), init=False, repr=False)

    def delay_for(self, address: str) -> float:
        """Seconds to wait before answering a new handshake from ``address``."""
        record = self._current(address)
        if self.clock() - self._room.last > self.forget_after_s:
            self._room.failures = 0
        own = self._delay(record.failures if record else 0, self.free_failures)
        return max(own, self._delay(self._room.failures, self.room_free_failures))

    def _delay(self, failures: int, free: int) -> float:
        if failures <= free:
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * 2 ** min(failures - free - 1, 32))

    def failed(self, address: str) -> None:
        record = self._current(address)
        if record is None:
            if len(self._records) >= self.max_tracked:
                self._evict()
            record = self._records[address] = _Record(0, self.clock())
        record.failures += 1
        record.last = self.clock()
        self._room.failures += 1  # a success elsewhere never forgives these
        self._room.last = record.last

    def succeeded(self, address: str) -> None:
        self._records.pop(address, None)

    def room_failures(self) -> int:
        """Failures from every address since the room-wide count was last forgotten."""
        if self.clock() - self._room.last > self.forget_after_s:
            return 0
        return self._room.failures

    def forget_room(self) -> None:
        """Start the room-wide count again (a fresh code: guesses at the old one tell nothing
        about it); each address keeps its own count, so a guesser stays slowed down."""
        self._room = _Record(0, 0.0)

    def failures(self, address: str) -> int:
        record = self._current(address)
        return 0 if record is None else record.failures

    def _current(self, address: str) -> _Record | None:
        record = self._records.get(address)
        if record is not None and self.clock() - record.last > self.forget_after_s:
            del self._records[address]
            return None
        return record

    def _evict(self) -> None:
        # Bounded memory under a flood of addresses: drop the stalest half.
        by_age = sorted(self._records, key=lambda a: self._records[a].last)
        for address in by_age[: len(by_age) // 2 + 1]:
            del self._records[address]
