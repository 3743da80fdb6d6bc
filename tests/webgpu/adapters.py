"""Whether this machine has a WebGPU adapter for wgpu (Mesa's lavapipe in CI: .ci/run installs it)."""

from __future__ import annotations

import functools
import os

import pytest


@functools.cache
def wgpu_adapter() -> str:
    from peerpipe.cluster.capabilities import wgpu_adapter as probe

    name = probe()
    return "" if name.startswith("unavailable") else name


needs_wgpu = pytest.mark.skipif(
    os.environ.get("CI") != "true" and not wgpu_adapter(),
    reason="no WebGPU adapter (pip install wgpu; apt install mesa-vulkan-drivers)",
)
