"""Network namespaces on one bridge, each link capped by ``tc tbf``, for benchmarks that cross a
network on one machine (bench/pipeline.py, wire.py, weights.py). Nothing touches this machine's
own interfaces; needs root, ip and tc."""

from __future__ import annotations

import os
import subprocess


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Namespaces:
    """``n`` namespaces on one bridge (in a namespace of its own), each link capped by ``tc tbf``.
    Nothing touches this machine's own interfaces."""

    def __init__(self, n: int, rate: str) -> None:
        tag = os.getpid() % 10000
        self.switch = f"ppsw{tag}"
        self.names = [f"ppn{tag}-{i}" for i in range(n)]
        subnet = 20 + os.getpid() % 200
        self.ips = [f"10.214.{subnet}.{i + 1}" for i in range(n)]
        self.rate = rate

    def __enter__(self) -> Namespaces:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, ip) in enumerate(zip(self.names, self.ips, strict=True)):
            _ip("netns", "add", ns)
            _ip("link", "add", f"ppv{i}", "type", "veth", "peer", "name", f"ppb{i}")
            _ip("link", "set", f"ppv{i}", "netns", ns)
            _ip("link", "set", f"ppb{i}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"ppb{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", f"ppv{i}")
            _ip("-n", ns, "link", "set", f"ppv{i}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", f"ppv{i}", "root", "tbf", "rate", self.rate,
                 "burst", "64kb", "latency", "50ms"],
                check=True, capture_output=True, timeout=10,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

    def prefix(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.names[i])
