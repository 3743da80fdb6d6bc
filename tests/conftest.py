"""Shared fixtures: tiny Hugging Face-layout models written on the fly, never downloaded."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from peerpipe.devtools.tiny_model import write_tiny_model

# Tests compare against transformers; it must never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Benchmarks and room files of this run (and the processes it starts) stay out of ~/.cache.
os.environ["PEERPIPE_CACHE"] = tempfile.mkdtemp(prefix="peerpipe-test-cache-")

MakeTiny = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> MakeTiny:
    """A factory ``make_tiny(arch="llama", **write_tiny_model_kwargs) -> Path``.

    Directories are cached by their arguments for the whole session; treat them as read-only.
    """
    cache: dict[str, Path] = {}

    def make_tiny(arch: str = "llama", **kw: Any) -> Path:
        key = json.dumps([arch, kw], sort_keys=True, default=str)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = write_tiny_model(path, arch, **kw)
        return cache[key]

    return make_tiny


@pytest.fixture(scope="session")
def warm_bench() -> None:
    """Measure this machine's device once, so node processes read it from the cache instead of
    all measuring at once on a small CI machine."""
    from peerpipe.cluster.benchmark import BenchCache
    from peerpipe.cluster.capabilities import detect

    BenchCache(detect("cpu"), quick=True).device()
