"""Node processes keep OpenMP's idle spin short (cli/main.quiet_openmp), so nodes sharing a
machine do not burn each other's cores after every step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peerpipe.cli.main import OPENMP_SPIN, quiet_openmp


def test_short_spin_is_a_default_the_users_settings_override() -> None:
    env: dict[str, str] = {}
    quiet_openmp(env)
    assert env == OPENMP_SPIN
    env = {"GOMP_SPINCOUNT": "50000"}
    quiet_openmp(env)
    assert env == {**OPENMP_SPIN, "GOMP_SPINCOUNT": "50000"}
    env = {"OMP_WAIT_POLICY": "active"}  # a chosen policy: nothing added that would change it
    quiet_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "active"}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in (*OPENMP_SPIN, "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}


def test_the_command_sets_it_before_torch_loads() -> None:
    code = (
        "import os, sys\n"
        "from peerpipe.cli.main import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == [OPENMP_SPIN["GOMP_SPINCOUNT"], "False"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: torch runs no OpenMP worker threads")
def test_an_idle_process_stops_spinning_soon() -> None:
    """After a parallel product, 300 ms of idleness cost under 5 ms of CPU (the default spin
    burns 3-11 ms of it on the 2-core VM)."""
    code = (
        "import resource, time, torch\n"
        "torch.set_num_threads(2)\n"
        "w, x = torch.randn(2048, 2048), torch.randn(1, 2048)\n"
        "for _ in range(20):\n    torch.nn.functional.linear(x, w)\n"
        "cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])\n"
        "before = cpu()\ntime.sleep(0.3)\nprint(cpu() - before)\n"
    )
    env = _clean_env()
    quiet_openmp(env)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout.split()[-1]) < 0.005
