"""Link measurements across a shaped veth pair between two network namespaces.

``tc tbf`` caps the pair at 40 Mbit/s each way; the bandwidth the nodes measure (and report in
the room view) must find that cap, and the plan sends hidden states over it as int8 (``--wire
auto``). Nothing leaves the test's own namespaces.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.inference.test_pipeline_cli import memory_gb
from tests.room.roomproc import REPO, RoomProc

pytestmark = pytest.mark.netns
RATE_MBIT = 40


def test_measured_bandwidth_finds_a_shaped_link(two_namespaces, tiny_model_dir, warm_layers) -> None:
    if shutil.which("tc") is None:
        pytest.skip("needs tc (iproute2) to shape the link")
    (host_ns, host_ip), (join_ns, join_ip) = two_namespaces
    for ns in (host_ns, join_ns):
        subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", f"v{ns}", "root", "tbf",
             "rate", f"{RATE_MBIT}mbit", "burst", "16kb", "latency", "100ms"],
            check=True, capture_output=True, timeout=10,
        )
    warm_layers(tiny_model_dir("llama"))
    model = str(tiny_model_dir("llama"))
    # Each node may hold three of the four layers: the plan needs both, across the slow link.
    half = ["--memory", memory_gb(tiny_model_dir("llama"), 3), "--context", "64", "--sessions", "4"]
    code = "8-amber-falcon"
    procs: list[RoomProc] = []
    try:
        host = RoomProc("host", "--listen", f"{host_ip}:0", "--no-mdns", "--code", code, "--model", model,
                        "--expect-nodes", "2", "--dtype", "float32", *half, prefix=("ip", "netns", "exec", host_ns))
        procs.append(host)
        port = host.expect(rf"^listening on {host_ip}:(\d+)$").group(1)
        member = RoomProc("join", code, "--peer", f"{host_ip}:{port}", "--listen", join_ip, "--model", model, *half[:2],
                          prefix=("ip", "netns", "exec", join_ns))
        procs.append(member)
        host.expect(r"^plan v1: ", timeout=60)
        out = subprocess.run(
            ["ip", "netns", "exec", host_ns, sys.executable, "-m", "peerpipe", "status", "--json",
             "--code", code, "--peer", f"{host_ip}:{port}"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        status = json.loads(out.stdout)
        # The hop crosses 40 Mbit/s: its hidden states go int8 (plan/wire.py), the last stage sends tokens.
        assert [s["wire"] for s in status["plan"]["stages"]] == ["int8", "native"], status["plan"]
        links = status["links"]
        assert len(links) == 2, links  # each side measured the other
        cap = RATE_MBIT * 1e6 / 8 / (1 << 20)
        for link in links:
            assert 0.5 * cap < link["mib_per_s"] < 1.3 * cap, (link, cap)
            assert link["rtt_ms"] > 0
    finally:
        for p in procs:
            p.stop()
