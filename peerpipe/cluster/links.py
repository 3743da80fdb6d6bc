"""Measure the network between this node and its peers: round trip and bandwidth.

The round trip is the best of a few empty pings; the bandwidth comes from pings that carry a
payload: (payload) / (its round trip - the empty round trip). Pings are answered by the peer's
transport itself, so the figure includes encryption on both ends, as real traffic does.
"""

from __future__ import annotations

from collections.abc import Iterable

from peerpipe.protocol import LinkStat
from peerpipe.room import LINK_ERRORS, RoomNode

PROBE_BYTES = 1 << 20


async def measure_link(
    node: RoomNode, peer: str, *, payload_bytes: int = PROBE_BYTES, rounds: int = 3, timeout_s: float = 10.0
) -> LinkStat:
    # A member that just joined may still be dialling its peers.
    await node.wait_for_peer(peer, timeout_s)
    rtt = min([await node.probe(peer, 0, timeout_s) for _ in range(rounds + 2)])
    loaded = min([await node.probe(peer, payload_bytes, timeout_s) for _ in range(rounds)])
    transfer = max(loaded - rtt, 1e-6)
    return LinkStat(node.node_id, peer, rtt * 1e3, payload_bytes / transfer / (1 << 20))


async def measure_links(node: RoomNode, peers: Iterable[str], **kwargs: float) -> tuple[tuple[LinkStat, ...], str]:
    """Links to every peer in ``peers`` that is connected, one at a time (measuring two at once
    would halve both); returns the links and a note of the peers that could not be measured."""
    stats: list[LinkStat] = []
    failed: list[str] = []
    for peer in peers:
        if peer == node.node_id:
            continue
        try:
            stats.append(await measure_link(node, peer, **kwargs))  # type: ignore[arg-type]
        except (*LINK_ERRORS, TimeoutError) as exc:
            failed.append(f"{peer[:8]}: {exc}")
    return tuple(stats), "; ".join(failed)
