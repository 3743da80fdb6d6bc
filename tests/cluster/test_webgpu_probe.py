"""The WebGPU probe runs only when asked, and what the native loader prints on the process's
stderr (``XDG_RUNTIME_DIR is invalid``) never reaches the terminal. A stand-in ``wgpu`` module
takes the library's place here: it records being imported and writes to file descriptor 2 as
the Vulkan loader does."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerpipe.cluster.capabilities import detect, wgpu_adapter

FAKE = textwrap.dedent(
    """
    import os

    class _Adapter:
        info = {"device": "Test GPU", "backend_type": "Vulkan"}

    class _Gpu:
        def request_adapter_sync(self, **kw):
            os.write(2, b"error: XDG_RUNTIME_DIR is invalid or not set in the environment.\\n")
            return _Adapter()

    gpu = _Gpu()
    """
)


@pytest.fixture
def fake_wgpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    (tmp_path / "wgpu.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = sys.modules.pop("wgpu", None)
    yield
    # The stand-in must not outlive the test: later tests use the real library.
    sys.modules.pop("wgpu", None)
    if real is not None:
        sys.modules["wgpu"] = real


def test_detecting_a_device_does_not_probe_webgpu(fake_wgpu: None, capfd: pytest.CaptureFixture[str]) -> None:
    caps = detect("cpu")
    assert caps.wgpu_adapter == "" and "wgpu" not in sys.modules
    assert "XDG_RUNTIME_DIR" not in capfd.readouterr().err


def test_asking_probes_quietly(fake_wgpu: None, capfd: pytest.CaptureFixture[str]) -> None:
    assert wgpu_adapter() == "Test GPU (Vulkan)"
    assert detect("cpu", webgpu=True).wgpu_adapter == "Test GPU (Vulkan)"
    assert capfd.readouterr().err == ""
