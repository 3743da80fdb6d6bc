"""Two network namespaces joined by a veth pair: a joiner finds the host by code alone (mDNS).

The namespaces, the veth pair and the 10.213.x.x addresses exist only for the test;
nothing is sent on this machine's own interfaces.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from roomproc import RoomProc

pytestmark = pytest.mark.netns


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_namespaces(warm_bench: None) -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
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


def test_joiner_finds_host_in_another_namespace_by_code(
    two_namespaces: tuple[tuple[str, str], tuple[str, str]],
) -> None:
    (host_ns, host_ip), (join_ns, join_ip) = two_namespaces
    procs: list[RoomProc] = []
    try:
        host = RoomProc(
            "host", "--listen", host_ip, "--code", "9-amber-falcon", prefix=("ip", "netns", "exec", host_ns)
        )
        procs.append(host)
        host.expect(r"^room code: 9-amber-falcon$")
        port = host.expect(rf"^listening on {re.escape(host_ip)}:(\d+)$").group(1)
        joiner = RoomProc(
            "join", "9-amber-falcon", "--listen", join_ip, prefix=("ip", "netns", "exec", join_ns)
        )
        procs.append(joiner)
        joiner.expect(rf"^joined room 9: host \S+ at {re.escape(host_ip)}:{port}$", timeout=15)
        host.expect(rf"^joined: \S+ \(\w+\) from {re.escape(join_ip)}:\d+$")
        joiner.interrupt()
        assert joiner.wait() == 0
        host.expect(r"^left: .*said goodbye$")
        host.interrupt()
        assert host.wait() == 0
    finally:
        for p in procs:
            p.stop()
