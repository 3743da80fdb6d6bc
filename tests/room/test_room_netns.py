"""Two network namespaces joined by a veth pair: a joiner finds the host by code alone (mDNS).

The namespaces, the veth pair and the 10.213.x.x addresses exist only for the test;
nothing is sent on this machine's own interfaces.
"""

from __future__ import annotations

import re

import pytest
from roomproc import RoomProc

pytestmark = pytest.mark.netns


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
