"""The host's side of the cluster: membership, failure detection, benchmarks and plans.

The host owns the cluster view. Messages and clock ticks become reducer events; each change of
the view is broadcast to every connected peer (members and observers such as ``peerpipe
status``). When the set of live members changes, a debounced replan asks nodes for whatever
measurements are missing, plans, sends the plan out and collects acknowledgements.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from peerpipe.cluster.links import measure_links
from peerpipe.cluster.local import LocalDevice
from peerpipe.cluster.membership import (
    Beat,
    ClusterView,
    Event,
    Joined,
    Left,
    Lost,
    MembershipConfig,
    Tick,
    reduce,
)
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.cluster.planning import RoomFacts, plan_room, to_protocol
from peerpipe.engine.generate import GenerationResult, OnText
from peerpipe.engine.sampling import SamplingParams
from peerpipe.engine.tokenizer import Tokenizer
from peerpipe.errors import PeerpipeError
from peerpipe.inference.errors import NotReadyError
from peerpipe.inference.pipeline import Pipeline
from peerpipe.inference.runtime import StageRuntime
from peerpipe.plan import Budget, PlanError, PlanResult
from peerpipe.protocol import (
    BenchmarkRequest,
    BenchmarkResult,
    Cancel,
    ComputeError,
    ComputeRequest,
    ComputeResult,
    DistributionPlan,
    GenerateDone,
    GenerateRequest,
    GenerateText,
    Heartbeat,
    JoinCluster,
    LayerTiming,
    LeaveCluster,
    LinkStat,
    MemberState,
    Message,
    NodeInfo,
    Plan,
    PlanAck,
    RoomView,
    TaskInfo,
)
from peerpipe.room import LINK_ERRORS, HandshakeRefused, MessageFrom, PeerJoined, PeerLeft, RoomNode

log = logging.getLogger(__name__)
Report = Callable[[str], None]


@dataclass(frozen=True)
class ClusterConfig:
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    replan_debounce_s: float = 1.0
    benchmark_timeout_s: float = 120.0
    measure_links: bool = True
    auto_plan: bool = True
    expect_nodes: int = 1  # plan once this many nodes (the host included) are alive
    budget: Budget = field(default_factory=Budget)
    strategy: str = "optimal"
    objective: str = "latency"
    ready_timeout_s: float = 60.0  # how long a request waits for the stages to load
    prefill_timeout_s: float = 300.0  # the first token of an answer
    step_timeout_s: float = 60.0  # every later token


def describe_plan(plan: Plan, names: dict[str, str]) -> str:
    stages = " -> ".join(f"{names.get(s.node_id, s.node_id[:8])}[{s.start},{s.end})" for s in plan.stages)
    return f"plan v{plan.version}: {stages}, {plan.predicted_ms:.2f} ms/token predicted"


class ClusterHost:
    def __init__(
        self,
        node: RoomNode,
        device: LocalDevice,
        config: ClusterConfig | None = None,
        model: ModelChoice | None = None,
        *,
        address: str = "",
        report: Report | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.device = device
        self.config = config or ClusterConfig()
        self.model = model
        self.clock = clock
        self.report = report or (lambda line: log.info("%s", line))
        self.info = device.node_info(node.node_id, node.name, address)
        self.view = reduce(ClusterView(), Joined(self.info, clock()), self.config.membership)
        self.timings: dict[str, LayerTiming] = {}
        self.links: dict[tuple[str, str], LinkStat] = {}
        self.plan: Plan | None = None
        self.plan_result: PlanResult | None = None
        self.acked: set[str] = set()
        self._changed = asyncio.Event()  # set whenever the view, the plan or the acks change
        self._versions = itertools.count(1)
        self._versions_used = 0
        self._request_ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[BenchmarkResult]] = {}
        self._replan = asyncio.Event()
        self._alive: frozenset[str] = frozenset(self.view.ids)
        self._tg: asyncio.TaskGroup | None = None
        # The data plane: this node's own stage, and the pipeline once every stage has loaded.
        self.runtime: StageRuntime | None = None
        self.pipeline: Pipeline | None = None
        self.tokenizer: Tokenizer | None = None
        if self.model is not None:
            self._replan.set()
            self.runtime = StageRuntime(
                node.node_id,
                node.name,
                self.model.path,
                device=device.caps.torch_device,
                memory_bytes=device.offered_bytes,
                send=self.route,
                report=self.report,
            )

    # -- running ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; then tell every peer the room is closing."""
        runtime_stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tasks = [
                tg.create_task(self._events()),
                tg.create_task(self._ticks()),
                tg.create_task(self._planner()),
            ]
            if self.runtime is not None:
                tg.create_task(self.runtime.run(runtime_stop))
            await stop.wait()
            if self.pipeline is not None:
                self.pipeline.close("the host closed the room")
            runtime_stop.set()
            for task in tasks:
                task.cancel()
        self._tg = None

    async def _events(self) -> None:
        async for event in self.node.events():
            if isinstance(event, PeerJoined):
                await self._send(event.peer.node_id, self.room_view())
            elif isinstance(event, MessageFrom):
                await self._on_message(event.peer.node_id, event.message)
            elif isinstance(event, PeerLeft):
                if self.pipeline is not None:
                    self.pipeline.node_lost(event.peer.node_id, event.reason)
                member = self.view.get(event.peer.node_id)
                gone = Left if event.error is None else Lost
                await self._apply(gone(event.peer.node_id, self.clock()))
                if member is not None:
                    how = "said goodbye" if event.error is None else f"lost: {event.reason}"
                    self.report(f"left: {member.info.name} ({member.info.node_id[:8]}), {how}")
            elif isinstance(event, HandshakeRefused):
                self.report(f"refused {event.address[0]}:{event.address[1]}: {event.error}")

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
        elif isinstance(message, BenchmarkResult):
            waiter = self._waiting.pop(message.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
        elif isinstance(message, PlanAck):
            await self._on_ack(peer, message)
        elif isinstance(message, ComputeResult | ComputeError):
            if self.pipeline is not None:
                self.pipeline.deliver(peer, message)
        elif isinstance(message, ComputeRequest):
            if self.runtime is None or not self.runtime.submit(message):
                await self._send(peer, ComputeError(message.task_id, f"{self.node.name} holds no stage"))
        elif isinstance(message, Cancel):
            # From a client: stop its request. (Stages' cancels to this node come through route().)
            if self.pipeline is not None:
                self.pipeline.cancel(message.task_id)
        elif isinstance(message, GenerateRequest):
            assert self._tg is not None
            self._tg.create_task(self._serve(peer, message))

    async def _on_ack(self, peer: str, ack: PlanAck) -> None:
        if self.plan is None or ack.version != self.plan.version:
            return
        if not ack.ok:
            name = self.names().get(peer, peer[:8])
            self.report(f"{name} could not take its stage of plan v{ack.version}: {ack.error}")
            return
        stages = {s.node_id for s in self.plan.stages}
        complete_before = self.acked >= stages
        self.acked.add(peer)
        # Decided before awaiting anything: acks handled meanwhile must not build a second pipeline.
        if self.acked >= stages and not complete_before:
            self.report(f"plan v{self.plan.version} acknowledged by every stage")
            self._make_pipeline()
        await self._broadcast()

    async def _ticks(self) -> None:
        period = min(0.25, self.config.membership.heartbeat_s / 4)
        while True:
            await asyncio.sleep(period)
            now = self.clock()
            # The host beats for itself: it never misses its own heartbeat.
            stats = self.runtime.stats if self.runtime else None
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
            self._alive = alive
            for gone in set(self.timings) - set(self.view.ids):
                del self.timings[gone]
            self.links = {k: v for k, v in self.links.items() if k[0] in alive and k[1] in alive}
            self._replan.set()
        await self._broadcast()

    # -- the view ---------------------------------------------------------------------------

    def room_view(self) -> RoomView:
        now = self.clock()
        members = tuple(
            MemberState(
                m.info,
                health=m.health,
                status=m.status,
                load=m.load,
                heartbeat_age_ms=max(0.0, (now - m.last_beat) * 1e3),
                timing=self.timings.get(m.info.node_id),
                steps=m.steps,
                compute_s=m.compute_s,
            )
            for m in self.view.members
        )
        acked = tuple(sorted(self.acked))
        links = tuple(self.links.values())
        tasks = tuple(
            TaskInfo(t.task_id, t.status.value, t.prompt_tokens, len(t.tokens), t.tok_s, t.error[:4000])
            for t in (self.pipeline.active_tasks() if self.pipeline else [])
        )
        heartbeat = self.config.membership.heartbeat_s
        return RoomView(self.view.epoch, members, self.plan, acked, links, heartbeat, tasks)

    async def wait_until(self, condition: Callable[[ClusterHost], bool], timeout_s: float) -> None:
        """Return once ``condition(self)`` holds, checked after every change of the view, the plan
        or the acknowledgements; ``TimeoutError`` after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while not condition(self):
                self._changed.clear()
                await self._changed.wait()

    async def _broadcast(self, message: Message | None = None) -> None:
        self._changed.set()
        message = message or self.room_view()
        await asyncio.gather(*(self._send(peer, message) for peer in self.node.peers))

    async def _send(self, peer: str, message: Message) -> None:
        # A peer that just left is not an error of ours: its PeerLeft event follows.
        with contextlib.suppress(*LINK_ERRORS):
            await self.node.send(peer, message)

    def names(self) -> dict[str, str]:
        return {m.info.node_id: m.info.name for m in self.view.members}

    # -- planning ---------------------------------------------------------------------------

    async def _planner(self) -> None:
        debounce = self.config.replan_debounce_s
        while True:
            await self._replan.wait()
            # Debounce: several nodes joining together cause one plan, not several.
            while True:
                self._replan.clear()
                try:
                    async with asyncio.timeout(debounce):
                        await self._replan.wait()
                except TimeoutError:
                    break
            if self.model is None or not self.config.auto_plan:
                continue
            alive = self.view.alive()
            # expect_nodes gates the first plan only: later, the room replans with whoever is left.
            if self._versions_used == 0 and len(alive) < self.config.expect_nodes:
                self.report(f"waiting for nodes: {len(alive)} of {self.config.expect_nodes} in the room")
                continue
            await self.measure()
            if self._replan.is_set():
                continue  # the room changed while we measured: measure and plan again
            await self.replan()

    async def measure(self) -> None:
        """Layer timings and links that are still missing, from every live member at once."""
        assert self.model is not None
        model = self.model
        alive = [m.info.node_id for m in self.view.alive()]
        me = self.node.node_id
        jobs = []
        if me not in self.timings:
            jobs.append(self._measure_self(model))
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
            )
            jobs.append(self._ask(peer, request))
        await asyncio.gather(*jobs)

    async def _measure_self(self, model: ModelChoice) -> None:
        try:
            self.timings[self.node.node_id] = await self.device.layer_timing(model.shape_json, model.dtype)
        except (PeerpipeError, RuntimeError) as exc:  # e.g. out of memory: plan with an estimate
            self.report(f"could not time a layer here ({exc}): this node's speed is estimated")

    async def _measure_own_links(self, alive: list[str]) -> None:
        todo = [p for p in alive if p != self.node.node_id and (self.node.node_id, p) not in self.links]
        stats, failed = await measure_links(self.node, todo)
        for stat in stats:
            self.links[(stat.src, stat.dst)] = stat
        if failed:
            self.report(f"links not measured: {failed}")

    async def _ask(self, peer: str, request: BenchmarkRequest) -> None:
        waiter: asyncio.Future[BenchmarkResult] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = waiter
        name = self.names().get(peer, peer[:8])
        try:
            await self.node.send(peer, request)
            async with asyncio.timeout(self.config.benchmark_timeout_s):
                result = await waiter
        except (*LINK_ERRORS, TimeoutError) as exc:
            self.report(f"no benchmark from {name} ({exc or 'timed out'}): its speed is estimated")
            return
        finally:
            self._waiting.pop(request.request_id, None)
        if result.timing is not None:
            self.timings[peer] = result.timing
        for stat in result.links:
            if stat.src == peer:
                self.links[(stat.src, stat.dst)] = stat
        if result.error:
            self.report(f"benchmark on {name}: {result.error}")

    async def replan(self) -> Plan | None:
        """Plan for the live members now and send the plan out; None if the model does not fit."""
        assert self.model is not None
        model = self.model
        facts = RoomFacts(self.room_view().members, tuple(self.links.values()), self.timings)
        try:
            result = plan_room(
                model.spec,
                model.shape_key,
                facts,
                entry=self.node.node_id,
                half=model.half,
                budget=self.config.budget,
                strategy=self.config.strategy,
                objective=self.config.objective,
            )
        except PlanError as exc:
            self.plan, self.plan_result, self.acked = None, None, set()
            self.report(f"cannot plan {model.model_id}: {exc}")
            await self._broadcast()
            return None
        self._versions_used += 1
        plan = to_protocol(result, next(self._versions), model.spec)
        if self.pipeline is not None:
            self.pipeline.close(f"the room was planned again (v{plan.version})")
            self.pipeline = None
        self.plan, self.plan_result, self.acked = plan, result, set()
        self.report(describe_plan(plan, self.names()))
        budget = self.config.budget
        message = DistributionPlan(plan, model.shape_key, model.dtype, self.max_seq, budget.sessions)
        await self._broadcast(message)
        await self._broadcast()
        await self._take_own_stage(message)
        return plan

    @property
    def max_seq(self) -> int:
        """Positions per session every stage holds: the planned context, within the model's."""
        assert self.model is not None
        return min(self.config.budget.context_tokens, self.model.config.max_positions)

    async def _take_own_stage(self, message: DistributionPlan) -> None:
        if self.runtime is None:
            return
        error = await self.runtime.apply(message, self.node.node_id)
        if self.plan is None or self.plan.version != message.plan.version:
            return  # planned again meanwhile
        if error:
            self.report(f"{self.node.name} could not take its stage of plan v{message.plan.version}: {error}")
            return
        await self._on_ack(self.node.node_id, PlanAck(message.plan.version))

    def _make_pipeline(self) -> None:
        assert self.plan is not None and self.model is not None and self.model.path is not None
        if self.pipeline is not None and self.pipeline.plan.version == self.plan.version:
            return
        if self.tokenizer is None:
            from peerpipe.engine.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_dir(self.model.path)
        self.pipeline = Pipeline(
            self.plan,
            host_id=self.node.node_id,
            send=self.route,
            tokenizer=self.tokenizer,
            sessions=self.config.budget.sessions,
            max_seq=self.max_seq,
            names=self.names(),
            step_timeout_s=self.config.step_timeout_s,
            prefill_timeout_s=self.config.prefill_timeout_s,
        )
        if self.pipeline.local:
            self.report("ready: every layer is on this node; answers run locally, with no network hops")
        else:
            self.report(f"ready: {' -> '.join(self.pipeline.describe())}")
        self._changed.set()

    # -- the data plane ---------------------------------------------------------------------

    async def route(self, node_id: str, message: Message) -> None:
        """Send on the data plane; to this node itself without touching the network."""
        if node_id != self.node.node_id:
            await self.node.send(node_id, message)
        elif isinstance(message, ComputeRequest | Cancel):
            if self.runtime is None or not self.runtime.submit(message):
                if isinstance(message, ComputeRequest) and self.pipeline is not None:
                    self.pipeline.deliver(node_id, ComputeError(message.task_id, "the host holds no stage"))
        elif isinstance(message, ComputeResult | ComputeError) and self.pipeline is not None:
            self.pipeline.deliver(node_id, message)

    async def ready_pipeline(self, timeout_s: float) -> Pipeline:
        """The pipeline once every stage has loaded the current plan; ``NotReadyError`` if it is
        not ready within ``timeout_s`` (saying what is missing)."""
        try:
            await self.wait_until(lambda h: h.ready, timeout_s)
        except TimeoutError:
            raise NotReadyError(self.why_not_ready()) from None
        assert self.pipeline is not None
        return self.pipeline

    @property
    def ready(self) -> bool:
        """A pipeline whose stages have all loaded the current plan, and still takes work."""
        return self.pipeline is not None and not self.pipeline.closed

    def why_not_ready(self) -> str:
        if self.model is None:
            return "the host serves no model: start it with --model DIR"
        if self.plan is None:
            return f"the room has no plan for {self.model.model_id} yet (see the host's output)"
        missing = [s.node_id for s in self.plan.stages if s.node_id not in self.acked]
        names = self.names()
        return "waiting for stages to load: " + ", ".join(names.get(m, m[:8]) for m in missing)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, on_text: OnText | None = None, *, timeout_s: float = 60.0
    ) -> GenerationResult:
        pipeline = await self.ready_pipeline(timeout_s)
        return await pipeline.generate(prompt_ids, params, on_text)

    async def _serve(self, peer: str, request: GenerateRequest) -> None:
        """Answer a client's generate-request, streaming text in order, then generate-done."""
        from peerpipe.engine.defaults import sampling_params
        from peerpipe.engine.generate import encode_prompt

        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        async def stream() -> None:
            while (piece := await pieces.get()) is not None:
                await self._send(peer, GenerateText(request.request_id, piece))

        assert self._tg is not None
        streamer = self._tg.create_task(stream())
        try:
            pipeline = await self.ready_pipeline(self.config.ready_timeout_s)
            assert self.model is not None and self.tokenizer is not None
            params = sampling_params(request, self.model.path)
            if request.prompt_ids:
                ids = list(request.prompt_ids)
            else:
                ids = encode_prompt(self.tokenizer, request.prompt, chat=request.chat, system=request.system or None)
            tag = request.request_id[:8]
            self.report(f"request {tag}: started, {len(ids)} prompt tokens")
            result = await pipeline.generate(ids, params, pieces.put_nowait, task_id=request.request_id)
            self.report(f"request {tag}: {len(result.tokens)} tokens, {result.tok_s:.1f} tok/s, {result.finish_reason}")
            done = GenerateDone(
                request.request_id,
                result.finish_reason,
                result.text,
                tuple(result.tokens),
                tuple(result.prompt_ids),
                result.prefill_s,
                result.decode_s,
                stages=tuple(pipeline.describe()),
            )
        except PeerpipeError as exc:
            self.report(f"request {request.request_id[:8]}: failed: {exc}")
            done = GenerateDone(request.request_id, "error", "", (), (), 0.0, 0.0, error=str(exc)[:4000])
        pieces.put_nowait(None)
        await streamer
        await self._send(peer, done)


def describe_device(info: NodeInfo) -> str:
    gib = info.memory_bytes / (1 << 30)
    return (
        f"{info.device} {info.device_name}: {info.tflops:.2f} TFLOPS, "
        f"{info.memory_bandwidth_gbps:.0f} GB/s, {gib:.1f} GiB offered"
    )
