"""Link emulation for tests and benchmarks: added one-way latency on every write of a process.

This kernel has no netem, so latency is added here, in user space. Nothing is emulated unless a
test or benchmark installs it: in-process with ``delay_links``, or in a ``peerpipe`` process with
``PEERPIPE_LINK_DELAY_MS`` in its environment (read once, at the command's start).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable

from peerpipe.transport.stream import wrap_transports

ENV = "PEERPIPE_LINK_DELAY_MS"


class DelayedTransport:
    """A transport whose writes (and close) leave ``delay`` seconds late, in order: a link with
    that much more latency and the same bandwidth."""

    def __init__(self, transport: asyncio.BaseTransport, delay: float, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._delay = delay
        self._loop = loop

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)

    def _later(self, fn: Callable[..., object], *args: object) -> None:
        self._loop.call_later(self._delay, fn, *args)

    def write(self, data: bytes | memoryview) -> None:
        self._later(self._transport.write, bytes(data))  # type: ignore[attr-defined]

    def writelines(self, parts: Iterable[bytes | memoryview]) -> None:
        self._later(self._transport.write, b"".join(parts))  # type: ignore[attr-defined]

    def close(self) -> None:
        self._later(self._transport.close)


def delay_links(delay_s: float) -> None:
    """Delay every write of streams opened from now on by ``delay_s`` seconds (0 undoes it)."""
    if delay_s < 0:
        raise ValueError(f"a link delay cannot be negative: {delay_s}")
    if delay_s == 0:
        wrap_transports(None)
        return
    wrap_transports(lambda transport, loop: DelayedTransport(transport, delay_s, loop))  # type: ignore[return-value]


def delay_from_environment() -> float:
    """Install the delay ``PEERPIPE_LINK_DELAY_MS`` asks for (if any); returns it in seconds."""
    text = os.environ.get(ENV, "")
    try:
        delay_s = max(0.0, float(text)) / 1e3 if text else 0.0
    except ValueError:
        raise ValueError(f"{ENV} must be a number of milliseconds, not {text!r}") from None
    if delay_s:
        delay_links(delay_s)
    return delay_s
