"""Where peerpipe keeps files between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$PEERPIPE_CACHE``, else ``$XDG_CACHE_HOME/peerpipe``, else ``~/.cache/peerpipe``."""
    if explicit := os.environ.get("PEERPIPE_CACHE"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peerpipe"
