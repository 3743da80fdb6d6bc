"""``peerpipe demo`` on a fresh machine: forms a room on loopback and answers, in bounded time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_demo_forms_a_room_and_answers(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "peerpipe", "demo", "--nodes", "3", "--max-tokens", "12"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"room code: \d+-[a-z]+-[a-z]+", out.stdout)
    assert out.stdout.count("joined:") == 2
    assert "room ready: 3 nodes" in out.stdout
    assert re.search(r"\[\d+ tokens at [0-9.]+ tok/s", out.stdout)
    # The model was written once into the cache folder and is reused.
    assert (tmp_path / "peerpipe" / "demo-model-v1" / "model.safetensors").is_file()
    assert "Traceback" not in out.stderr
