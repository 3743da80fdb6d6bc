"""peerpipe: run one large language model across the machines of a local network.

``peerpipe.create_room`` and ``peerpipe.join_room`` are the Python API (``peerpipe.python_api``);
they load on first use, so importing peerpipe stays light for the command line.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "create_room", "join_room"]


def __getattr__(name: str) -> Any:
    if name in ("create_room", "join_room"):
        from peerpipe import python_api

        return getattr(python_api, name)
    raise AttributeError(f"module 'peerpipe' has no attribute {name!r}")
