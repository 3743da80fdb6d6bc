"""Link emulation: with a delay installed, round trips grow by twice the delay (each side delays
its own writes); without it, nothing is delayed. PEERPIPE_LINK_DELAY_MS installs the same."""

from __future__ import annotations

import asyncio

import pytest

from peerpipe.room import Host, Member, parse_code
from peerpipe.transport.emulation import delay_from_environment, delay_links

CODE = parse_code("9-quiet-harbour")


async def best_rtt() -> float:
    async with Host(CODE, name="h") as host:
        addr = await host.open(("127.0.0.1", 0), advertise=False)
        async with Member(CODE, name="m") as member:
            peer = await member.join(addr)
            return min([await member.probe(peer.node_id, 0, 5.0) for _ in range(5)])


@pytest.mark.parametrize("delay_ms", [0.0, 20.0])
def test_added_latency_shows_in_round_trips(delay_ms: float) -> None:
    delay_links(delay_ms / 1e3)
    try:
        rtt = asyncio.run(asyncio.wait_for(best_rtt(), 30))
    finally:
        delay_links(0)
    assert 2 * delay_ms / 1e3 <= rtt < 2 * delay_ms / 1e3 + 0.015, rtt


def test_the_environment_variable_installs_the_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERPIPE_LINK_DELAY_MS", "20")
    try:
        assert delay_from_environment() == pytest.approx(0.02)
        rtt = asyncio.run(asyncio.wait_for(best_rtt(), 30))
    finally:
        delay_links(0)
    assert rtt >= 0.04, rtt
    monkeypatch.setenv("PEERPIPE_LINK_DELAY_MS", "fast")
    with pytest.raises(ValueError, match="PEERPIPE_LINK_DELAY_MS must be a number"):
        delay_from_environment()
