"""A member's side of the cluster: join, beat, answer benchmarks, take plans, mesh with peers.

Members connect to each other as well as to the host (the one with the larger node id dials),
so links can be measured pair by pair and hidden states flow stage to stage directly. Events
come in through ``on_event`` from the node's dispatcher, which keeps the data plane's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable

from peerpipe.cluster.local import LocalDevice
from peerpipe.cluster.local_stage import LocalStage
from peerpipe.cluster.membership import MembershipConfig
from peerpipe.logs import Report, log_reporter
from peerpipe.protocol import (
    BenchmarkRequest,
    DistributionPlan,
    Heartbeat,
    JoinCluster,
    LeaveCluster,
    Message,
    NewCode,
    Plan,
    PlanAck,
    RoomView,
)
from peerpipe.room import (
    LINK_ERRORS,
    CodeFormatError,
    MessageFrom,
    PeerLeft,
    RoomCode,
    RoomEvent,
    RoomNode,
    parse_code,
)
from peerpipe.transport import ConnectionClosedError

log = logging.getLogger(__name__)


class ClusterMember:
    def __init__(
        self,
        node: RoomNode,
        host_id: str,
        device: LocalDevice,
        stage: LocalStage,
        *,
        address: str = "",
        membership: MembershipConfig | None = None,
        report: Report | None = None,
    ) -> None:
        self.node = node
        self.host_id = host_id
        self.device = device
        self.stage = stage
        self.membership = membership or MembershipConfig()
        self.info = device.node_info(node.node_id, node.name, address)
        self.report = report or log_reporter(log)
        self.view: RoomView | None = None
        self.plan: Plan | None = None
        self._dialing: set[str] = set()
        self._in_view = False  # whether a view has listed this node since it (re)joined
        self._host_gone: asyncio.Future[PeerLeft] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self.on_new_code: Callable[[RoomCode], None] | None = None  # the room's code changed

    async def run(self, stop: asyncio.Event) -> None:
        """Be a member until ``stop`` is set or the host goes; raises if the host was lost."""
        host_gone = self._host_gone = asyncio.get_running_loop().create_future()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg  # set before the first await: from here on, no event of the host is dropped
            await self._send(JoinCluster(self.info))  # if the host is already gone, its PeerLeft says so
            beats = tg.create_task(self._beats())
            stopped = tg.create_task(stop.wait())
            await asyncio.wait([stopped, host_gone], return_when=asyncio.FIRST_COMPLETED)
            # Leaving: the host's messages from now on are dropped, not made tasks of a group that
            # is closing (which would raise and take the node's dispatcher down with it).
            self._tg = None
            for task in (beats, stopped):
                task.cancel()
        if host_gone.done():
            left = host_gone.result()
            if left.error is not None:
                raise ConnectionClosedError(f"lost the host: {left.error}")
            self.report(f"left: {left.reason or 'the host closed the room'}")
            return
        with contextlib.suppress(*LINK_ERRORS):
            await self.node.send(self.host_id, LeaveCluster(self.node.node_id))

    async def _send(self, message: Message) -> None:
        with contextlib.suppress(*LINK_ERRORS):
            await self.node.send(self.host_id, message)

    async def _beats(self) -> None:
        while True:
            status = "busy" if self.device.meter.busy else ("loading" if self.stage.loading else "idle")
            try:
                stats = self.stage.stats
                beat = Heartbeat(self.device.meter.load(), status, stats.steps, stats.compute_s)
                await self.node.send(self.host_id, beat)
            except LINK_ERRORS:
                return  # the host is gone; on_event reports it
            # The host says how often it expects a beat.
            await asyncio.sleep(self.view.heartbeat_s if self.view else self.membership.heartbeat_s)

    async def on_event(self, event: RoomEvent) -> None:
        """Take one of the node's events (start ``run`` first, or the host's messages are dropped)."""
        if isinstance(event, PeerLeft) and event.peer.node_id == self.host_id:
            if self._host_gone is not None and not self._host_gone.done():
                self._host_gone.set_result(event)
        elif isinstance(event, MessageFrom) and event.peer.node_id == self.host_id and self._tg is not None:
            self._from_host(event.message, self._tg)

    def _from_host(self, message: Message, tg: asyncio.TaskGroup) -> None:
        if isinstance(message, RoomView):
            if self.view is None or message.epoch >= self.view.epoch:
                self.view = message
                self._mesh(message, tg)
                listed = any(m.info.node_id == self.node.node_id for m in message.members)
                if self._in_view and not listed:
                    # Declared dead (frozen, or cut off too long) but still connected: join again.
                    self.report("the host dropped this node from the room; joining again")
                    tg.create_task(self._send(JoinCluster(self.info)))
                self._in_view = listed
        elif isinstance(message, BenchmarkRequest):
            tg.create_task(self._benchmark(message))
        elif isinstance(message, NewCode):
            try:
                self.node.code = parse_code(message.code)
            except CodeFormatError as exc:
                log.warning("the host sent a code that does not parse: %s", exc)
            else:
                self.report(f"the host gave the room a fresh code: {self.node.code}")
                if self.on_new_code is not None:
                    self.on_new_code(self.node.code)
        elif isinstance(message, DistributionPlan) and message.prefetch:
            tg.create_task(self._prefetch(message))
        elif isinstance(message, DistributionPlan):
            tg.create_task(self._take_plan(message))

    def _mesh(self, view: RoomView, tg: asyncio.TaskGroup) -> None:
        connected = set(self.node.peers)
        for member in view.members:
            peer = member.info
            if (
                peer.node_id < self.node.node_id  # the larger id dials, so a pair connects once
                and peer.address
                and peer.node_id not in connected
                and peer.node_id not in self._dialing
            ):
                self._dialing.add(peer.node_id)
                tg.create_task(self._dial(peer.node_id, peer.address))

    async def _dial(self, node_id: str, address: str) -> None:
        host, _, port = address.rpartition(":")
        try:
            await self.node.dial((host.strip("[]"), int(port)))
        except (*LINK_ERRORS, OSError, ValueError) as exc:
            log.info("could not reach member %s at %s: %s", node_id[:8], address, exc)
        finally:
            self._dialing.discard(node_id)

    async def _benchmark(self, request: BenchmarkRequest) -> None:
        result = await self.device.answer(self.node, request)
        if request.manifest_id:
            result = dataclasses.replace(result, held_layers=await self.stage.held_layers(request.manifest_id))
        with contextlib.suppress(*LINK_ERRORS):
            await self.node.send(self.host_id, result)

    async def _prefetch(self, message: DistributionPlan) -> None:
        error = await self.stage.prefetch(message, self.host_id)
        if error:
            self.report(f"cannot fetch the layers of plan v{message.plan.version}: {error}")
        with contextlib.suppress(*LINK_ERRORS):
            await self.node.send(self.host_id, PlanAck(message.plan.version, ok=not error, error=error[:4000], prefetched=True))

    async def _take_plan(self, message: DistributionPlan) -> None:
        plan = message.plan
        self.plan = plan
        error = await self.stage.apply(message, self.host_id)
        if error:
            self.report(f"cannot take the stage of plan v{plan.version}: {error}")
        with contextlib.suppress(*LINK_ERRORS):
            await self.node.send(self.host_id, PlanAck(plan.version, ok=not error, error=error[:4000]))
