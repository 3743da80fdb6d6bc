"""A plan's layers fetched ahead: while the current plan serves, the nodes the new one gives
layers they lack get it with ``prefetch`` set, fetch, and answer ``plan-ack(prefetched)``; only
then does the rollout send the plan for real (docs/weights.md, "A replan fetches before it
switches")."""

from __future__ import annotations

import asyncio
import contextlib

from peerpipe.plan.reuse import Holdings
from peerpipe.protocol import DistributionPlan, Plan, PlanAck
from peerpipe.room import LINK_ERRORS, RoomNode


def lacking(plan: Plan, held: Holdings) -> list[str]:
    """The nodes ``plan`` gives layers (stages or standbys) they do not hold."""
    ranges = [(s.node_id, s.start, s.end) for s in (*plan.stages, *plan.standbys)]
    return sorted({n for n, a, b in ranges if any(i not in held.layers.get(n, frozenset()) for i in range(a, b))})


class Prefetch:
    def __init__(self) -> None:
        self.version = 0
        self._waiting: dict[str, asyncio.Future[PlanAck]] = {}

    def on_ack(self, peer: str, ack: PlanAck) -> None:
        waiter = self._waiting.get(peer)
        if ack.version == self.version and waiter is not None and not waiter.done():
            waiter.set_result(ack)

    async def run(
        self, node: RoomNode, message: DistributionPlan, nodes: list[str], changed: asyncio.Event, timeout_s: float
    ) -> dict[str, PlanAck] | None:
        """Send ``message`` to ``nodes`` and wait for their acks (those that came, after
        ``timeout_s``); None when ``changed`` was set meanwhile (the room changed: plan again)."""
        loop = asyncio.get_running_loop()
        self.version = message.plan.version
        self._waiting = {n: loop.create_future() for n in nodes}
        try:
            for peer in nodes:
                with contextlib.suppress(*LINK_ERRORS):
                    await node.send(peer, message)
            room_changed = asyncio.ensure_future(changed.wait())
            acked = asyncio.ensure_future(asyncio.wait(list(self._waiting.values())))
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.wait([room_changed, acked], return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                pass
            finally:
                room_changed.cancel()
                acked.cancel()
            if changed.is_set():
                return None
            return {peer: f.result() for peer, f in self._waiting.items() if f.done() and not f.cancelled()}
        finally:
            for future in self._waiting.values():
                future.cancel()
            self._waiting = {}
