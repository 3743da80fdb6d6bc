"""Fixtures of the failover tests: this machine measured once, and a six-layer tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from peerpipe.cluster.local import LocalDevice


@pytest.fixture(scope="module")
def device(warm_bench: None) -> LocalDevice:
    return asyncio.run(LocalDevice.measure("cpu", quick=True))


@pytest.fixture
def model(tiny_model_dir, warm_layers) -> Path:
    path = tiny_model_dir("llama", config_overrides={"num_hidden_layers": 6})
    warm_layers(path)
    return path
