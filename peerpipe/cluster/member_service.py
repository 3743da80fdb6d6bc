"""A member's side of the cluster: join, beat, answer benchmarks, take plans, mesh with peers.

Members connect to each other as well as to the host (the one with the larger node id dials),
so links can be measured pair by pair and, later, hidden states flow stage to stage directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from peerpipe.cluster.local import LocalDevice
from peerpipe.cluster.membership import MembershipConfig
from peerpipe.inference.runtime import StageRuntime
from peerpipe.protocol import (
    BenchmarkRequest,
    Cancel,
    ComputeError,
    ComputeRequest,
    DistributionPlan,
    Heartbeat,
    JoinCluster,
    LeaveCluster,
    Message,
    Plan,
    PlanAck,
    RoomView,
)
from peerpipe.room import LINK_ERRORS, MessageFrom, PeerLeft, RoomNode
from peerpipe.transport import ConnectionClosedError

log = logging.getLogger(__name__)
Report = Callable[[str], None]
# Takes a plan (loads this node's stage); returns an error text, or "" if ok.
OnPlan = Callable[[DistributionPlan], Awaitable[str]]


class ClusterMember:
    def __init__(
        self,
        node: RoomNode,
        host_id: str,
        device: LocalDevice,
        *,
        address: str = "",
        membership: MembershipConfig | None = None,
        model_dir: Path | None = None,
        on_plan: OnPlan | None = None,
        report: Report | None = None,
    ) -> None:
        self.node = node
        self.host_id = host_id
        self.device = device
        self.membership = membership or MembershipConfig()
        self.info = device.node_info(node.node_id, node.name, address)
        self.report = report or (lambda line: log.info("%s", line))
        self.runtime = StageRuntime(
            node.node_id,
            node.name,
            model_dir,
            device=device.caps.torch_device,
            memory_bytes=device.offered_bytes,
            send=node.send,
            report=self.report,
        )
        self.on_plan: OnPlan = on_plan or (lambda message: self.runtime.apply(message, host_id))
        self.view: RoomView | None = None
        self.plan: Plan | None = None
        self._dialing: set[str] = set()
        self._in_view = False  # whether a view has listed this node since it (re)joined

    async def run(self, stop: asyncio.Event) -> None:
        """Be a member until ``stop`` is set or the host goes; raises if the host was lost."""
        await self._send(JoinCluster(self.info))  # if the host is already gone, its PeerLeft says so
        host_gone: asyncio.Future[PeerLeft] = asyncio.get_running_loop().create_future()
        runtime_stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._beats()),
                tg.create_task(self._events(host_gone, tg)),
            ]
            tg.create_task(self.runtime.run(runtime_stop))
            stopped = tg.create_task(stop.wait())
            await asyncio.wait([stopped, host_gone], return_when=asyncio.FIRST_COMPLETED)
            runtime_stop.set()
            for task in [*tasks, stopped]:
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
            status = "busy" if self.device.meter.busy else ("loading" if self.runtime.loading else "idle")
            try:
                stats = self.runtime.stats
                beat = Heartbeat(self.device.meter.load(), status, stats.steps, stats.compute_s)
                await self.node.send(self.host_id, beat)
            except LINK_ERRORS:
                return  # the host is gone; _events reports it
            # The host says how often it expects a beat.
            await asyncio.sleep(self.view.heartbeat_s if self.view else self.membership.heartbeat_s)

    async def _events(self, host_gone: asyncio.Future[PeerLeft], tg: asyncio.TaskGroup) -> None:
        async for event in self.node.events():
            if isinstance(event, PeerLeft) and event.peer.node_id == self.host_id:
                host_gone.set_result(event)
                return
            if not isinstance(event, MessageFrom):
                continue
            message = event.message
            if isinstance(message, ComputeRequest | Cancel):
                # The data plane: from the previous stage or, for the first stage, the host.
                if not self.runtime.submit(message) and isinstance(message, ComputeRequest):
                    error = ComputeError(message.task_id, f"{self.node.name} holds no stage of this plan")
                    tg.create_task(self._send(error))
            elif event.peer.node_id == self.host_id:
                self._from_host(message, tg)

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
        with contextlib.suppress(*LINK_ERRORS):
            await self.node.send(self.host_id, result)

    async def _take_plan(self, message: DistributionPlan) -> None:
        plan = message.plan
        self.plan = plan
        error = await self.on_plan(message)
        if error:
            self.report(f"cannot take the stage of plan v{plan.version}: {error}")
        with contextlib.suppress(*LINK_ERRORS):
            await self.node.send(self.host_id, PlanAck(plan.version, ok=not error, error=error[:4000]))
