"""The link-emulation hook: with PEERPIPE_LINK_DELAY_MS set, round trips grow by twice the delay
(each side delays its own writes); without it, nothing is delayed."""

from __future__ import annotations

import asyncio

import pytest

from peerpipe.room import Host, Member, parse_code

CODE = parse_code("9-quiet-harbour")


async def best_rtt() -> float:
    async with Host(CODE, name="h") as host:
        addr = await host.open(("127.0.0.1", 0), advertise=False)
        async with Member(CODE, name="m") as member:
            peer = await member.join(addr)
            return min([await member.probe(peer.node_id, 0, 5.0) for _ in range(5)])


@pytest.mark.parametrize("delay_ms", [0.0, 20.0])
def test_added_latency_shows_in_round_trips(monkeypatch: pytest.MonkeyPatch, delay_ms: float) -> None:
    monkeypatch.setenv("PEERPIPE_LINK_DELAY_MS", str(delay_ms))
    rtt = asyncio.run(asyncio.wait_for(best_rtt(), 30))
    assert 2 * delay_ms / 1e3 <= rtt < 2 * delay_ms / 1e3 + 0.015, rtt
