"""The event loop peerpipe runs on: uvloop where it is installed, asyncio otherwise."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
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
