"""``peerpipe doctor`` on this machine: every check runs and says what it found, a problem comes
with its fix, and only a failed check fails the command."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from peerpipe.models import default_model_dir
from tests.room.roomproc import REPO

CHECKS = ["python", "torch", "device", "memory", "disk", "cache", "address", "port", "mdns", "http"]


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerpipe", "doctor", "--listen", "127.0.0.1", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def test_a_healthy_machine_passes_and_names_every_check() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:  # the API port is taken: a warning, not a failure
        out = doctor("--model", "austen", "--http", f"127.0.0.1:{busy.getsockname()[1]}", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == [*CHECKS, "model"] and report["ok"]
    assert checks["python"]["status"] == checks["torch"]["status"] == "ok"
    assert checks["port"]["status"] == "ok" and "accepts connections" in checks["port"]["detail"]
    assert checks["mdns"]["status"] == "ok", checks["mdns"]  # advertised and found again on loopback
    assert checks["http"]["status"] == "warn" and "--http" in checks["http"]["fix"]
    assert checks["model"]["status"] == "ok" and "fits this device" in checks["model"]["detail"]
    assert checks["address"]["status"] == "warn" and checks["address"]["fix"]  # loopback only


def test_a_broken_model_fails_with_the_reason_and_a_fix(tmp_path: Path) -> None:
    broken = tmp_path / "cut"
    shutil.copytree(default_model_dir(), broken)
    (broken / "tokenizer.json").unlink()
    out = doctor("--model", str(broken))
    assert out.returncode == 1, out.stdout
    line = next(x for x in out.stdout.splitlines() if x.startswith("fail") and " model " in x)
    assert "tokenizer.json" in line and "->" in line
    assert out.stdout.splitlines()[-1] == "1 check(s) failed"
    assert sum(x.split()[0] in ("ok", "warn", "fail") for x in out.stdout.splitlines()) == len(CHECKS) + 1
