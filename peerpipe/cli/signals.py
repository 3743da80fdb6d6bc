"""Ctrl-C and SIGTERM for commands that start up and then serve (host, join, demo).

While a command starts (measuring, loading, planning) a signal cancels it at once: it exits 130
and says it was interrupted, whatever it was waiting for. Once it serves, a signal asks it to
stop: it says goodbye to the room and exits 0. A second signal while it winds down ends the
process at once, for a room that will not close quickly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from peerpipe.transport import run

EXIT_INTERRUPTED = 130


class Interrupts:
    def __init__(self) -> None:
        self.stop = asyncio.Event()  # set by a signal once the command serves
        self.interrupted = False  # a signal came before it served
        self._serving = False
        self._main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)

    def serving(self) -> None:
        """From now on a signal stops the command politely instead of interrupting it."""
        self._serving = True

    def _on_signal(self) -> None:
        if self.interrupted or self.stop.is_set():
            print("peerpipe: interrupted again: exiting now", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        if self._serving:
            self.stop.set()
        elif self._main is not None:
            self.interrupted = True
            self._main.cancel()


def run_command(main: Callable[[Interrupts], Awaitable[int]]) -> int:
    """Run a serving command's coroutine; a signal before it serves raises KeyboardInterrupt
    here (the CLI prints "interrupted" and exits 130)."""

    async def body() -> int | None:
        signals = Interrupts()
        try:
            return await main(signals)
        except asyncio.CancelledError:
            if signals.interrupted:
                return None
            raise

    code = run(body())
    if code is None:
        raise KeyboardInterrupt
    return code
