"""The host's side of the cluster: membership, failure detection and the room view.

The host owns the cluster view. Messages and clock ticks become reducer events; each change of
the view is broadcast to every connected peer (members and observers such as ``peerpipe
status``). When the set of live members changes, the rollout (``cluster/rollout.py``) plans
again. Data-plane messages never reach this class: the node's dispatcher keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from peerpipe.cluster.config import ClusterConfig
from peerpipe.cluster.estimates import EstimateWatch, StageEstimate
from peerpipe.cluster.local import LocalDevice
from peerpipe.cluster.local_stage import LocalStage
from peerpipe.cluster.membership import (
    Beat,
    ClusterView,
    Event,
    HostAway,
    Joined,
    Left,
    Lost,
    Tick,
    reduce,
    unique_names,
)
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.cluster.rollout import Rollout
from peerpipe.logs import Report, log_reporter
from peerpipe.protocol import (
    BenchmarkResult,
    Heartbeat,
    JoinCluster,
    LeaveCluster,
    MemberState,
    Message,
    NewCode,
    NodeInfo,
    PlanAck,
    RoomView,
    TaskInfo,
)
from peerpipe.room import (
    LINK_ERRORS,
    HandshakeRefused,
    Host,
    MessageFrom,
    PeerJoined,
    PeerLeft,
    RoomCode,
    RoomEvent,
    generate_code,
)

log = logging.getLogger(__name__)


class ClusterHost:
    def __init__(
        self,
        node: Host,
        device: LocalDevice,
        config: ClusterConfig | None = None,
        model: ModelChoice | None = None,
        *,
        stage: LocalStage | None = None,
        address: str = "",
        report: Report | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.device = device
        self.config = config or ClusterConfig()
        self.model = model
        self.stage = stage
        self.clock = clock
        self.report = report or log_reporter(log)
        self.info = device.node_info(node.node_id, node.name, address)
        self.view = reduce(ClusterView(), Joined(self.info, clock()), self.config.membership)
        self.rollout = Rollout(self, model, stage=stage) if model is not None else None
        # The answers the data plane is running, for the room view (the assembly sets it).
        self.tasks: Callable[[], tuple[TaskInfo, ...]] = tuple
        self.pace: Callable[[], float] = lambda: 0.0  # measured ms per token of recent answers
        self._changed = asyncio.Event()  # set whenever the view, the plan or the acks change
        self._alive: frozenset[str] = frozenset(self.view.ids)
        self.rotate_hint = "Room.rotate_code() gives it one"  # the CLI names its own way
        rollout = self.rollout
        self.estimates = EstimateWatch(
            lambda: rollout.plan if rollout is not None else None,
            lambda: self.room_view().members,
            lambda: not any(t.status in ACTIVE_TASKS for t in self.tasks()),
            rollout.remeasure if rollout is not None else _nothing,
        )
        if rollout is not None:
            rollout.on_publish = self.estimates.begin

    # -- running ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the view (and plan, with a model) until ``stop`` is set. Events come in through
        ``on_event`` from the node's dispatcher."""
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._ticks())]
            if self.rollout is not None:
                tasks.append(tg.create_task(self.rollout.run()))
                tasks.append(tg.create_task(self.estimates.run()))
            await stop.wait()
            for task in tasks:
                task.cancel()

    async def on_event(self, event: RoomEvent) -> None:
        if isinstance(event, PeerJoined):
            await self._send(event.peer.node_id, self.room_view())
        elif isinstance(event, MessageFrom):
            await self._on_message(event.peer.node_id, event.message)
        elif isinstance(event, PeerLeft):
            member = self.view.get(event.peer.node_id)
            gone = Left if event.error is None else Lost
            await self._apply(gone(event.peer.node_id, self.clock()))
            if member is not None:
                how = "said goodbye" if event.error is None else f"lost: {event.reason}"
                self.report(f"left: {member.info.name} ({member.info.node_id[:8]}), {how}")
        elif isinstance(event, HandshakeRefused):
            self.report(f"refused {event.address[0]}:{event.address[1]}: {event.error}")
            if event.failures in GUESS_WARNINGS or event.room_failures == ROOM_GUESS_WARNING:
                self.report(
                    f"warning: {event.failures} wrong code(s) from {event.address[0]}, {event.room_failures} in all: "
                    "someone may be guessing the room's code. Their joins are slowed down; to shut them out, "
                    f"give the room a fresh code ({self.rotate_hint}); members already in stay"
                )

    async def rotate_code(self) -> RoomCode:
        """A fresh code for the room: only it admits from now on. Members hear it (their new
        connections to each other use it); connections already open stay."""
        code = generate_code()
        await self.node.rotate_code(code)
        await self.broadcast(NewCode(str(code)))
        self.report(f"the room's code is now {code} (the old one admits no one)")
        return code

    async def _on_message(self, peer: str, message: Message) -> None:
        if isinstance(message, Heartbeat):
            beat = Beat(peer, message.load, message.status, self.clock(), message.steps, message.compute_s)
            await self._apply(beat)
        elif isinstance(message, JoinCluster):
            info = message.node_info
            if info.node_id != peer:
                log.warning("peer %s tried to join as %s: ignored", peer, info.node_id)
                return
            await self._apply(Joined(info, self.clock()))
            seen = self.node.peers.get(peer)
            where = f" from {seen.address[0]}:{seen.address[1]}" if seen else ""
            self.report(f"joined: {info.name} ({peer[:8]}){where}")
            self.report(f"node {info.name}: {describe_device(info)}")
        elif isinstance(message, LeaveCluster) and message.peer_id == peer:
            member = self.view.get(peer)
            await self._apply(Left(peer, self.clock()))
            if member is not None:
                self.report(f"left: {member.info.name} ({peer[:8]}), said goodbye")
        elif isinstance(message, BenchmarkResult) and self.rollout is not None:
            self.rollout.on_benchmark(message)
        elif isinstance(message, PlanAck) and self.rollout is not None:
            await self.rollout.on_ack(peer, message)

    async def _ticks(self) -> None:
        period = min(0.25, self.config.membership.heartbeat_s / 4)
        last = self.clock()
        while True:
            await asyncio.sleep(period)
            now = self.clock()
            away, last = now - last - period, now
            if away > self.config.membership.heartbeat_s:  # (this host, not its members, was silent)
                await self._apply(HostAway(away))
                self.report(f"this host stood still for {away:.1f} s: members' silence counts from now")
            # The host beats for itself: it never misses its own heartbeat.
            stats = self.stage.stats if self.stage else None
            steps, compute_s = (stats.steps, stats.compute_s) if stats else (0, 0.0)
            await self._apply(Beat(self.node.node_id, self.device.meter.load(), self._status(), now, steps, compute_s))
            before = {m.info.node_id: m for m in self.view.members}
            await self._apply(Tick(now))
            for m in self.view.members:
                if not before[m.info.node_id].suspected and m.suspected:
                    self.report(f"suspected: {m.info.name} ({m.info.node_id[:8]}) missed its heartbeats")
            for node_id in before.keys() - set(self.view.ids):
                name = before[node_id].info.name
                silent = self.config.membership.dead_after_s
                self.report(f"dead: {name} ({node_id[:8]}) sent no heartbeat for {silent:g} s")

    def _status(self) -> str:
        return "busy" if self.device.meter.busy else "idle"

    async def _apply(self, event: Event) -> None:
        old = self.view
        self.view = reduce(old, event, self.config.membership)
        if self.view.epoch == old.epoch:
            return
        alive = frozenset(m.info.node_id for m in self.view.alive())
        if alive != self._alive:
            lost = self._alive - alive
            self._alive = alive
            if self.rollout is not None:
                self.rollout.want_replan(alive, lost=lost)
        await self.broadcast()

    async def check_stalled(self, node_ids: list[str], timeout_s: float = 1.0) -> None:
        """Answers stalled on these nodes: probe each, and drop from the room those that do not
        answer (asleep, stopped, cut off), as if their heartbeats had stopped. They join again
        when they wake."""
        me = self.node.node_id

        async def answers(peer: str) -> bool:
            try:
                await self.node.probe(peer, 0, timeout_s)
            except (*LINK_ERRORS, TimeoutError):
                return False
            return True

        peers = [p for p in dict.fromkeys(node_ids) if p != me and p in self.view.ids]
        replies = await asyncio.gather(*(answers(p) for p in peers))
        for peer, ok in zip(peers, replies, strict=True):
            if not ok:
                member = self.view.get(peer)
                name = member.info.name if member else peer[:8]
                self.report(f"stalled: {name} ({peer[:8]}) did not answer within {timeout_s:g} s; planning without it")
                await self._apply(Lost(peer, self.clock()))

    # -- the view ---------------------------------------------------------------------------

    def room_view(self) -> RoomView:
        now = self.clock()
        rollout = self.rollout
        timings = rollout.timings if rollout else {}
        members = tuple(
            MemberState(
                m.info,
                health=m.health,
                status=m.status,
                load=m.load,
                heartbeat_age_ms=max(0.0, (now - m.last_beat) * 1e3),
                timing=timings.get(m.info.node_id),
                steps=m.steps,
                compute_s=m.compute_s,
            )
            for m in self.view.members
        )
        plan = rollout.plan if rollout else None
        acked = tuple(sorted(rollout.acked)) if rollout else ()
        links = tuple(rollout.links.values()) if rollout else ()
        heartbeat = self.config.membership.heartbeat_s
        return RoomView(self.view.epoch, members, plan, acked, links, heartbeat, self.tasks(), self.pace())

    def why_not_ready(self) -> str:
        if self.rollout is None:
            return "the host serves no model: start it with --model DIR"
        return self.rollout.why_not_ready()

    async def wait_until(self, condition: Callable[[ClusterHost], bool], timeout_s: float) -> None:
        """Return once ``condition(self)`` holds, checked after every change of the view, the plan
        or the acknowledgements; ``TimeoutError`` after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while not condition(self):
                self._changed.clear()
                await self._changed.wait()

    async def broadcast(self, message: Message | None = None) -> None:
        """Send ``message`` (by default the room view, which changed) to every peer."""
        self._changed.set()
        message = message or self.room_view()
        await asyncio.gather(*(self._send(peer, message) for peer in self.node.peers))

    async def _send(self, peer: str, message: Message) -> None:
        # A peer that just left is not an error of ours: its PeerLeft event follows.
        with contextlib.suppress(*LINK_ERRORS):
            await self.node.send(peer, message)

    def names(self) -> dict[str, str]:
        return unique_names({m.info.node_id: m.info.name for m in self.view.members})



GUESS_WARNINGS = frozenset({5, 20, 100, 500})  # wrong codes from one address that make the host warn
ROOM_GUESS_WARNING = 16  # ... and from all addresses together (the room-wide slow-down starts there)
ACTIVE_TASKS = frozenset({"queued", "prefill", "decoding", "recovering"})


async def _nothing(node_id: str, estimate: StageEstimate) -> bool:
    """A host without a rollout has no benchmarks to redo: nothing is left to try again."""
    return True


def describe_device(info: NodeInfo) -> str:
    gib = info.memory_bytes / (1 << 30)
    return (
        f"{info.device} {info.device_name}: {info.tflops:.2f} TFLOPS, "
        f"{info.memory_bandwidth_gbps:.0f} GB/s, {gib:.1f} GiB offered"
    )
