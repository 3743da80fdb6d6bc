"""Plan rollout on the host: measure what is missing, plan, send the plan, collect acks.

When the set of live members changes the host asks for a replan: at once when a node is lost
(answers are waiting), after a debounce when nodes join. The rollout asks nodes for the layer
timings and links it lacks, plans, broadcasts the plan, hands the host's own stage its part, and,
once every stage has acknowledged, tells the data plane (``on_ready``). A new plan first tells it
what is coming (``on_replan``); a room that cannot hold the model tells it why
(``on_cannot_plan``). A node that cannot load its stage is left out of plans, with its reason,
until it leaves the room.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Callable
from typing import Protocol

from peerpipe.cluster.config import ClusterConfig
from peerpipe.cluster.estimates import StageEstimate
from peerpipe.cluster.links import measure_links
from peerpipe.cluster.local import LocalDevice
from peerpipe.cluster.local_stage import LocalStage
from peerpipe.cluster.membership import ClusterView
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.cluster.planning import (
    RoomFacts,
    lanes,
    network_from,
    plan_quantizing,
    same_machine,
    shared_memory,
    to_protocol,
    wire_formats,
)
from peerpipe.cluster.prefetch import Prefetch, lacking
from peerpipe.compute import SteppedAside
from peerpipe.errors import PeerpipeError
from peerpipe.logs import Report
from peerpipe.plan import PlanError
from peerpipe.plan.reuse import Holdings
from peerpipe.plan.standby import place_standbys, promote, uncovered
from peerpipe.protocol import (
    BenchmarkRequest,
    BenchmarkResult,
    DistributionPlan,
    LayerTiming,
    LinkStat,
    Message,
    Plan,
    PlanAck,
    PlanStage,
    RoomView,
)
from peerpipe.room import LINK_ERRORS, RoomNode


class Host(Protocol):
    """What the rollout needs of the host's cluster service."""

    node: RoomNode
    device: LocalDevice
    config: ClusterConfig
    view: ClusterView
    report: Report

    def names(self) -> dict[str, str]: ...
    def room_view(self) -> RoomView: ...
    async def broadcast(self, message: Message | None = None) -> None: ...

log = logging.getLogger(__name__)


def describe_plan(plan: Plan, names: dict[str, str]) -> str:
    stages = ""
    for s in plan.stages:
        stages += f"{names.get(s.node_id, s.node_id[:8])}[{s.start},{s.end})"
        if s.quantize not in ("", "none"):
            stages += f"({s.quantize})"  # a node that let the planner choose holds these in fewer bits
        if s is not plan.stages[-1]:
            stages += f" -{s.wire}-> " if s.wire else " -> "  # a hop in another format says which
    spares = ", ".join(f"{names.get(s.node_id, s.node_id[:8])}[{s.start},{s.end})" for s in plan.standbys)
    return f"plan v{plan.version}: {stages}, {plan.predicted_ms:.2f} ms/token predicted" + (spares and f"; standbys: {spares}")


class Rollout:
    def __init__(self, host: Host, model: ModelChoice, *, stage: LocalStage | None = None) -> None:
        self.host = host
        self.model = model
        self.stage = stage  # the host's own stage, if it serves one
        self.config = host.config
        self.timings: dict[str, LayerTiming] = {}
        self.links: dict[tuple[str, str], LinkStat] = {}
        self.plan: Plan | None = None
        self.acked: set[str] = set()
        # The data plane's hooks: a plan every stage has loaded, and a plan that replaces it.
        self.on_ready: Callable[[Plan, dict[str, str]], None] = lambda plan, names: None
        self.on_replan: Callable[[Plan], None] = lambda plan: None
        self.on_cannot_plan: Callable[[str], None] = lambda reason: None
        self.on_publish: Callable[[Plan], None] = lambda plan: None  # the estimate watch's baselines
        self.unable: dict[str, str] = {}  # nodes that could not load a stage, and why
        self._lost: set[str] = set()  # nodes lost since the last plan: replan without the debounce
        self._names: dict[str, str] = {}  # the nodes' names when the current plan was made
        self._versions = itertools.count(1)
        self._planned = 0
        self._request_ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[BenchmarkResult]] = {}
        self.held: dict[str, set[int]] = {}  # layers of the host's copy each node holds (it says, or it loaded them)
        self.prefetching = Prefetch()  # a plan's layers fetched before it is sent
        self._wanted = asyncio.Event()
        self._wanted.set()

    @property
    def max_seq(self) -> int:
        """Positions per session every stage holds: the planned context, within the model's."""
        return min(self.config.budget.context_tokens, self.model.config.max_positions)

    def want_replan(self, alive: frozenset[str], *, lost: frozenset[str] = frozenset()) -> None:
        """The live members changed: forget what the gone ones measured, and plan again: at once
        when nodes were ``lost`` (answers wait), by promoting standbys where the plan has them."""
        for gone in set(self.timings) - alive:
            del self.timings[gone]
        self.held = {node: layers for node, layers in self.held.items() if node in alive}
        for gone in set(self.unable) - alive:
            del self.unable[gone]  # it may come back fixed
        self.links = {k: v for k, v in self.links.items() if k[0] in alive and k[1] in alive}
        self._lost |= lost
        self._wanted.set()

    def _left_out(self) -> str:
        names = self.host.names()
        if not self.unable:
            return ""
        return "; left out: " + ", ".join(f"{names.get(n, n[:8])} ({why})" for n, why in self.unable.items())

    def why_not_ready(self) -> str:
        if self.plan is None:
            return f"the room has no plan for {self.model.model_id} yet (see the host's output)"
        names = self.host.names()
        missing = [s.node_id for s in self.plan.stages if s.node_id not in self.acked]
        return "waiting for stages to load: " + ", ".join(names.get(m, m[:8]) for m in missing)

    # -- the planner loop -------------------------------------------------------------------

    async def run(self) -> None:
        debounce = self.config.replan_debounce_s
        while True:
            await self._wanted.wait()
            # Debounce: several nodes joining together cause one plan, not several. A loss does
            # not wait: answers are paused until the next plan.
            while not self._lost:
                if self._planned == 0 and len(self.host.view.alive()) >= max(2, self.config.expect_nodes):
                    break  # every node the host was told to expect is in: the first plan need not wait
                self._wanted.clear()
                try:
                    async with asyncio.timeout(debounce):
                        await self._wanted.wait()
                except TimeoutError:
                    break
            lost, self._lost = frozenset(self._lost), set()
            self._wanted.clear()
            if not self.config.auto_plan:
                continue
            alive = self.host.view.alive()
            # expect_nodes gates the first plan only: later, the room replans with whoever is left.
            if self._planned == 0 and len(alive) < self.config.expect_nodes:
                self.host.report(f"waiting for nodes: {len(alive)} of {self.config.expect_nodes} in the room")
                continue
            if lost and await self._promote(lost):
                continue
            await self.measure()
            if self._wanted.is_set():
                continue  # the room changed while we measured: measure and plan again
            await self.replan()

    async def measure(self) -> None:
        """Layer timings and links that are still missing, from every live member at once."""
        host, model = self.host, self.model
        alive = [m.info.node_id for m in host.view.alive()]
        me = host.node.node_id
        jobs = []
        if me not in self.timings:
            jobs.append(self._measure_self())
        if self.config.measure_links:
            jobs.append(self._measure_own_links(alive))
        for peer in alive:
            if peer == me:
                continue
            links_to = [p for p in alive if p != peer and (peer, p) not in self.links] if self.config.measure_links else []
            if peer in self.timings and not links_to:
                continue
            request = BenchmarkRequest(
                next(self._request_ids),
                model.shape_json if peer not in self.timings else "",
                model.dtype,
                tuple(links_to),
                manifest_id=model.manifest_id,
            )
            jobs.append(self._ask(peer, request))
        await asyncio.gather(*jobs)

    async def _measure_self(self) -> None:
        host = self.host
        try:
            self.timings[host.node.node_id] = await host.device.layer_timing(self.model.shape_json, self.model.dtype)
        except (PeerpipeError, RuntimeError) as exc:  # e.g. out of memory: plan with an estimate
            host.report(f"could not time a layer here ({exc}): this node's speed is estimated")

    async def _measure_own_links(self, alive: list[str]) -> None:
        me = self.host.node.node_id
        todo = [p for p in alive if p != me and (me, p) not in self.links]
        stats, failed = await measure_links(self.host.node, todo)
        for stat in stats:
            self.links[(stat.src, stat.dst)] = stat
        if failed:
            self.host.report(f"links not measured: {failed}")

    async def _ask(self, peer: str, request: BenchmarkRequest) -> None:
        waiter: asyncio.Future[BenchmarkResult] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = waiter
        name = self.host.names().get(peer, peer[:8])
        try:
            await self.host.node.send(peer, request)
            async with asyncio.timeout(self.config.benchmark_timeout_s):
                result = await waiter
        except (*LINK_ERRORS, TimeoutError) as exc:
            self.host.report(f"no benchmark from {name} ({exc or 'timed out'}): its speed is estimated")
            return
        finally:
            self._waiting.pop(request.request_id, None)
        if result.timing is not None:
            self.timings[peer] = result.timing
        if result.held_layers:
            self.held.setdefault(peer, set()).update(result.held_layers)
        for stat in result.links:
            if stat.src == peer:
                self.links[(stat.src, stat.dst)] = stat
        if result.error:
            self.host.report(f"benchmark on {name}: {result.error}")

    async def remeasure(self, node_id: str, estimate: StageEstimate) -> bool:
        """Time ``node_id``'s layer again, past its cache: its stage runs at a pace the plan did
        not predict. The fresh figure replaces the old one here and in the node's cache. Returns
        whether one came back (a re-measure steps aside for answers that arrive meanwhile)."""
        host, model = self.host, self.model
        name = host.names().get(node_id, node_id[:8])
        host.report(
            f"{name}: predicted {estimate.predicted_ms:.2f} ms per decode step, measured {estimate.measured_ms:.2f}: "
            "timing its layers again"
        )
        before = self.timings.get(node_id)
        if node_id == host.node.node_id:
            try:
                self.timings[node_id] = await host.device.layer_timing(model.shape_json, model.dtype, fresh=True)
            except SteppedAside:
                host.report(f"{name}: timing stepped aside for answers; again when the room is idle")
            except (PeerpipeError, RuntimeError) as exc:
                host.report(f"could not time a layer here again ({exc})")
        else:
            await self._ask(node_id, BenchmarkRequest(next(self._request_ids), model.shape_json, model.dtype, fresh=True))
        after = self.timings.get(node_id)
        if after is None or after is before:
            return False
        if before is not None:
            host.report(f"{name}: one layer {before.decode_ms:.3f} -> {after.decode_ms:.3f} ms per token (used from the next plan on)")
        return True

    def on_benchmark(self, result: BenchmarkResult) -> None:
        waiter = self._waiting.pop(result.request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    # -- plans and acks ---------------------------------------------------------------------

    async def replan(self) -> Plan | None:
        """Plan for the live members now and send the plan out; None if the model does not fit."""
        host, model = self.host, self.model
        members = [m for m in host.room_view().members if m.info.node_id not in self.unable]
        facts = RoomFacts(members, tuple(self.links.values()), self.timings)
        try:
            result, auto = plan_quantizing(
                model.spec,
                model.shape_key,
                facts,
                entry=host.node.node_id,
                half=model.half,
                budget=self.config.budget,
                strategy=self.config.strategy,
                objective=self.config.objective,
                held=self._holdings(),
                wire=self.config.wire,
            )
        except PlanError as exc:
            self.plan, self.acked = None, set()
            host.report(f"cannot plan {model.model_id}: {exc}")
            self.on_cannot_plan(f"cannot plan {model.model_id}: {exc}{self._left_out()}")
            await host.broadcast()
            return None
        self._planned += 1
        stages = [(s.node_id, s.start, s.end) for s in result.stages]
        memory = {m.info.node_id: m.info.memory_bytes for m in members if m.health == "alive"}
        standbys = place_standbys(model.spec, self.config.budget, memory, stages, self.config.replicas)
        if self.config.replicas and (bare := uncovered(stages, standbys)):
            names = host.names()
            host.report("no memory for a standby of " + ", ".join(f"{names.get(n, n[:8])}[{a},{b})" for n, a, b in bare))
        infos = [m.info for m in members]
        network = network_from(self.links.values(), infos)
        local = same_machine({m.info.node_id: m.info.address for m in members})
        plan = to_protocol(
            result, next(self._versions), model.spec, standbys, network=network, wire=self.config.wire, local=local,
            shared=shared_memory(infos), quantize=auto, host=host.node.node_id,
        )
        plan = dataclasses.replace(plan, lanes=lanes([s.node_id for s in plan.stages], infos))
        if not await self._prefetch(plan):
            return None
        await self._publish(plan)
        return plan

    def _serving(self) -> bool:  # (a plan, every stage of which acknowledged it and is still in the room)
        nodes = {s.node_id for s in self.plan.stages} if self.plan is not None else set()
        return self.plan is not None and self.acked >= nodes and nodes <= set(self.host.view.ids)

    async def _prefetch(self, plan: Plan) -> bool:
        """While the current plan serves, have the nodes the new one gives layers they lack fetch
        them first, so answers pause only for loading from disk. False: the room changed meanwhile
        (plan again); a node that could not fetch is left to fail its plan as it would anyway."""
        held = self._holdings()
        if held is None or not self._serving():
            return True  # nothing serves: the stages fetch as they take the plan
        needing = lacking(plan, held)
        if not needing:
            return True
        host, model = self.host, self.model
        names = host.names()
        ranges = [(s.node_id, s.start, s.end) for s in (*plan.stages, *plan.standbys)]
        seconds = held.fetch_s(model.spec, ranges, network_from(self.links.values()))
        host.report(
            f"plan v{plan.version}: {', '.join(names.get(n, n[:8]) for n in needing)} fetch "
            f"{held.fetch_bytes(model.spec, ranges) / 1e6:.0f} MB of layers first (about {seconds:.0f} s); "
            f"plan v{self.plan.version if self.plan else 0} serves meanwhile"
        )
        message = DistributionPlan(
            plan, model.shape_key, model.dtype, self.max_seq, self.config.budget.sessions, model.manifest_id, prefetch=True
        )
        acks = await self.prefetching.run(host.node, message, needing, self._wanted, self.config.prefetch_timeout_s)
        if acks is None:
            host.report(f"plan v{plan.version} dropped: the room changed while its layers were fetched")
            return False
        if len(acks) < len(needing):
            host.report(f"plan v{plan.version}: fetching took over {self.config.prefetch_timeout_s:.0f} s; switching anyway")
        for node, ack in acks.items():
            if not ack.ok:
                host.report(f"{names.get(node, node[:8])} could not fetch its layers: {ack.error}")
        return True

    def _holdings(self) -> Holdings | None:
        """What each node holds of the host's copy (the host: all of it); None for a GGUF host."""
        if not self.model.manifest_id:
            return None
        me = self.host.node.node_id
        layers = {node: frozenset(held) for node, held in self.held.items()}
        layers[me] = frozenset(range(self.model.spec.num_layers))
        return Holdings(layers, source=me)

    async def _promote(self, lost: frozenset[str]) -> bool:
        """Fail over to the plan's standbys: each stage of a lost node goes to a node that holds
        its layers already, so the room serves again without loading anything."""
        plan = self.plan
        if plan is None or not plan.standbys:
            return False
        stages = [(s.node_id, s.start, s.end) for s in plan.stages]
        if not any(node in lost for node, _, _ in stages):
            return False
        promoted = promote(stages, [(s.node_id, s.start, s.end) for s in plan.standbys], lost)
        if promoted is None:
            return False
        names = self._names  # as the plan knew them: the lost are no longer in the view
        self.host.report("failover: standbys take over from " + ", ".join(names.get(n, n[:8]) for n in sorted(lost)))
        stages_after, spares = promoted
        infos = [m.info for m in self.host.room_view().members]
        network = network_from(self.links.values(), infos)
        local = same_machine({i.node_id: i.address for i in infos})
        formats = wire_formats(
            [n for n, _, _ in stages_after], self.model.spec, network, self.config.wire, local, shared_memory(infos),
            self.host.node.node_id,
        )
        failover = Plan(
            next(self._versions),
            plan.model_id,
            plan.num_layers,
            tuple(PlanStage(*s, 0.0, fmt) for s, fmt in zip(stages_after, formats, strict=True)),
            plan.predicted_ms,
            tuple(PlanStage(*s) for s in spares),
            lanes([n for n, _, _ in stages_after], infos),
        )
        await self._publish(failover)
        return True

    async def _publish(self, plan: Plan) -> None:
        """Make ``plan`` the room's: tell the data plane, every node, and the host's own stage."""
        host, model = self.host, self.model
        self.on_replan(plan)
        self.on_publish(plan)
        self.plan, self.acked, self._names = plan, set(), host.names()
        host.report(describe_plan(plan, self._names))
        message = DistributionPlan(
            plan, model.shape_key, model.dtype, self.max_seq, self.config.budget.sessions, model.manifest_id
        )
        await host.broadcast(message)
        await host.broadcast()
        await self._take_own_stage(message)

    async def _take_own_stage(self, message: DistributionPlan) -> None:
        if self.stage is None:
            return
        host = self.host
        error = await self.stage.apply(message, host.node.node_id)
        if self.plan is None or self.plan.version != message.plan.version:
            return  # planned again meanwhile
        await self.on_ack(host.node.node_id, PlanAck(message.plan.version, ok=not error, error=error[:4000]))

    async def on_ack(self, peer: str, ack: PlanAck) -> None:
        if ack.prefetched:
            self.prefetching.on_ack(peer, ack)
            return
        if self.plan is None or ack.version != self.plan.version:
            return
        if not ack.ok:
            name = self.host.names().get(peer, peer[:8])
            stages = {s.node_id for s in self.plan.stages}
            self.host.report(f"{name} could not take its stage of plan v{ack.version}: {ack.error}")
            if peer in stages:
                self.unable[peer] = ack.error
                self.host.report(f"planning around {name} until it leaves the room")
                self.want_replan(frozenset(m.info.node_id for m in self.host.view.alive()), lost=frozenset({peer}))
            return
        stages = {s.node_id for s in self.plan.stages}
        complete_before = self.acked >= stages
        self.acked.add(peer)
        for s in (*self.plan.stages, *self.plan.standbys):
            if s.node_id == peer:
                self.held.setdefault(peer, set()).update(range(s.start, s.end))
        # Decided before awaiting anything: acks handled meanwhile must not build a second pipeline.
        if self.acked >= stages and not complete_before:
            self.host.report(f"plan v{self.plan.version} acknowledged by every stage")
            self.on_ready(self.plan, self.host.names())
        await self.host.broadcast()
