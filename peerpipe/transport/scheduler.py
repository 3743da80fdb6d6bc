"""Which frame goes out next: control first, then bulk transfers in turn (pure, no I/O).

A *transfer* is what one ``send()`` produced: ``split(msg)`` gives the chunks of its
big tensors followed by the message itself, and those must stay in order. A single
non-bulk message (heartbeat, ping, bye, plan...) is control and jumps every queue,
so it never waits behind a 100 MB tensor. Bulk transfers take turns one frame at a
time (round robin), so one huge tensor does not starve a small one. Transfers that
must not overtake each other share a ``stream`` key and go out one after another.
Weight bulk (``is_background``) goes last: only when nothing else waits, in its order.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from peerpipe.protocol import Message, is_background, is_bulk

T = TypeVar("T")


@dataclass
class _Transfer(Generic[T]):
    frames: deque[Message]
    token: T | None


@dataclass
class SendScheduler(Generic[T]):
    """Frames waiting to be written. ``token`` comes back with a transfer's last frame (or from ``clear``)."""

    _control: deque[_Transfer[T]] = field(default_factory=deque)
    _streams: OrderedDict[Hashable, deque[_Transfer[T]]] = field(default_factory=OrderedDict)
    _background: deque[_Transfer[T]] = field(default_factory=deque)
    frames: int = 0  # frames still to write (read it directly on hot paths: no call)

    def __len__(self) -> int:
        """Frames still to write."""
        return self.frames

    def __bool__(self) -> bool:
        return self.frames > 0

    def add(self, frames: list[Message], token: T | None = None, stream: Hashable | None = None) -> None:
        if not frames:
            raise ValueError("a transfer needs at least one frame")
        transfer = _Transfer(deque(frames), token)
        self.frames += len(frames)
        if len(frames) == 1 and stream is None and is_background(frames[0]):
            self._background.append(transfer)
            return
        if len(frames) == 1 and not is_bulk(frames[0]) and stream is None:
            self._control.append(transfer)
            return
        key = stream if stream is not None else object()  # its own stream: takes turns with the others
        self._streams.setdefault(key, deque()).append(transfer)

    def pop(self) -> tuple[Message, T | None] | None:
        """The next frame, and the token of its transfer when this frame completes it."""
        if self._control:
            transfer = self._control.popleft()
            self.frames -= 1
            return transfer.frames.popleft(), transfer.token
        if not self._streams:
            if self._background:
                transfer = self._background.popleft()
                self.frames -= 1
                return transfer.frames.popleft(), transfer.token
            return None
        key, transfers = next(iter(self._streams.items()))
        transfer = transfers[0]
        frame = transfer.frames.popleft()
        self.frames -= 1
        token = None
        if not transfer.frames:
            transfers.popleft()
            token = transfer.token
        if transfers:
            self._streams.move_to_end(key)  # round robin: the next stream gets the next turn
        else:
            del self._streams[key]
        return frame, token

    def clear(self) -> list[T]:
        """Drop everything unsent; returns the tokens of the dropped transfers (to fail their senders)."""
        tokens = [t.token for t in (*self._control, *self._background) if t.token is not None]
        for transfers in self._streams.values():
            tokens.extend(t.token for t in transfers if t.token is not None)
        self._control.clear()
        self._background.clear()
        self._streams.clear()
        self.frames = 0
        return tokens
