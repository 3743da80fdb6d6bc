"""Shared fixtures: tiny Hugging Face-layout models written on the fly, never downloaded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from peerpipe.devtools.tiny_model import write_tiny_model

# Tests compare against transformers; it must never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Benchmarks and room files of this run (and the processes it starts) stay out of ~/.cache.
os.environ["PEERPIPE_CACHE"] = tempfile.mkdtemp(prefix="peerpipe-test-cache-")
# ollama: models resolve in a store of the test's own, never in the user's ~/.ollama.
os.environ["OLLAMA_MODELS"] = tempfile.mkdtemp(prefix="peerpipe-test-ollama-")
# Hosts started by tests serve HTTP on a free port, never on the default one.
os.environ["PEERPIPE_HTTP"] = "127.0.0.1:0"

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


@pytest.fixture
def procs(warm_bench: None) -> Iterator[list[Any]]:
    """The CLI processes (``RoomProc``) a test starts, appended as it starts them: each is
    resumed if the test froze it, then killed, whatever the test's outcome."""
    started: list[Any] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGCONT)
        p.stop()


@pytest.fixture(scope="session")
def warm_bench() -> None:
    """Measure this machine's device once, so node processes read it from the cache instead of
    all measuring at once on a small CI machine."""
    from peerpipe.cluster.benchmark import BenchCache
    from peerpipe.cluster.capabilities import detect

    BenchCache(detect("cpu"), quick=True).device()


@pytest.fixture(scope="session")
def warm_layers(warm_bench: None) -> Callable[[Path], None]:
    """``warm(model_dir)``: time a layer of that model's shape once, here, so the nodes of a room
    on this one machine read it from the cache instead of timing it all at once (several
    processes' thread pools on two cores slow each other down by orders of magnitude)."""
    from peerpipe.cluster.benchmark import BenchCache
    from peerpipe.cluster.capabilities import detect
    from peerpipe.engine.config import ModelConfig

    cache = BenchCache(detect("cpu"), quick=True)

    def warm(model_dir: Path, dtype: str = "float32") -> None:
        cache.layer(ModelConfig.from_dir(model_dir), dtype)

    return warm


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_namespaces(warm_bench: None) -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
    """Two network namespaces joined by a veth pair ``v<ns>``: ``((host_ns, ip), (join_ns, ip))``.
    The namespaces, the pair and the 10.213.x.x addresses exist only for the test."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 ('ip' command) to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    host_ns, join_ns = f"pph{tag}", f"ppj{tag}"
    subnet = 10 + os.getpid() % 200
    host_ip, join_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
    created: list[str] = []
    try:
        for ns in (host_ns, join_ns):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", f"v{host_ns}", "type", "veth", "peer", "name", f"v{join_ns}")
        for ns, ip in ((host_ns, host_ip), (join_ns, join_ip)):
            _ip("link", "set", f"v{ns}", "netns", ns)
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", f"v{ns}")
            _ip("-n", ns, "link", "set", f"v{ns}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        yield (host_ns, host_ip), (join_ns, join_ip)
    finally:
        for ns in created:  # deleting a namespace also deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
