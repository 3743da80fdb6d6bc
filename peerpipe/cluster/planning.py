"""From what the room knows (members, measured layers, measured links) to the planner's inputs.

Pure functions: the host plans with them, and so does ``peerpipe plan`` for a live room or for
hypothetical machines.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peerpipe.plan import (
    Budget,
    DoesNotFitError,
    Link,
    ModelSpec,
    Network,
    NodeSpec,
    Objective,
    PlanResult,
    make_plan,
)
from peerpipe.plan.reuse import Holdings, prefer_held
from peerpipe.plan.spec import layer_scale
from peerpipe.plan.wire import choose_wire
from peerpipe.protocol import LayerTiming, LinkStat, MemberState, NodeInfo, Plan, PlanStage

# A device known only by its TFLOPS: assume this much memory bandwidth per TFLOPS (typical of
# consumer GPUs and laptops; CPUs have more per TFLOPS, datacentre GPUs less).
GBPS_PER_TFLOPS = 20.0


def node_spec(
    model: ModelSpec, info: NodeInfo, timing: LayerTiming | None, shape: str, *, half: bool, auto: str = "none"
) -> NodeSpec:
    """Measured layer times when the node timed this model's shape, else a roofline estimate;
    a node that quantizes its layers holds them in fewer bytes (``auto``: what a node that lets
    the planner choose is planned with)."""
    spec = _node_spec(model, info, timing, shape, half=half)
    mode = auto if info.quantize == "auto" else info.quantize
    if mode == "none":
        return spec
    return dataclasses.replace(spec, layer_scale=layer_scale(mode, model.dtype_bytes))


def _node_spec(
    model: ModelSpec, info: NodeInfo, timing: LayerTiming | None, shape: str, *, half: bool
) -> NodeSpec:
    if timing is not None and timing.shape_key == shape and timing.decode_ms > 0:
        return NodeSpec.measured(
            info.node_id,
            model,
            memory_bytes=info.memory_bytes,
            decode_layer_ms=timing.decode_ms,
            prefill_layer_ms=timing.prefill_ms,
            prefill_tokens=timing.prefill_tokens,
            measured_layer_bytes=timing.layer_bytes,
            stage_ms=timing.stage_overhead_ms,
            score=info.tflops_half if half and info.tflops_half else info.tflops,
        )
    tflops = (info.tflops_half if half and info.tflops_half else info.tflops) or 0.01
    gbps = info.memory_bandwidth_gbps or GBPS_PER_TFLOPS * tflops
    return NodeSpec.estimated(
        info.node_id,
        model,
        memory_bytes=info.memory_bytes,
        tflops=tflops,
        memory_gbps=gbps,
        launch_ms=info.latency_ms or 0.01,
    )


# A machine known only by what its owner says: a gigabit LAN at 94% of the line rate.
DEFAULT_NIC = Link(0.5, 1000e6 / 8 * 0.94)


def hypothetical_nodes(model: ModelSpec, nodes: Sequence[Mapping[str, Any]]) -> tuple[list[NodeSpec], dict[str, Link]]:
    """Planner nodes for machines described by name, memory (GB), TFLOPS and optionally memory
    GB/s, link RTT (ms) and Mbit/s; and each one's network link."""
    specs, nic = [], {}
    for n in nodes:
        specs.append(
            NodeSpec.estimated(
                n["name"],
                model,
                memory_bytes=int(n["mem"] * 1e9),
                tflops=n["tflops"],
                memory_gbps=n.get("gbps", GBPS_PER_TFLOPS * n["tflops"]),
            )
        )
        nic[n["name"]] = Link(n.get("rtt", 0.5), n.get("mbit", 1000.0) * 1e6 / 8 * 0.94)
    return specs, nic


def links_with(
    specs: Sequence[NodeSpec], measured: Mapping[tuple[str, str], Link], nic: Mapping[str, Link]
) -> dict[tuple[str, str], Link]:
    """The measured links plus, for each pair with a hypothetical end, the slower of the two ends'
    networks."""
    links = dict(measured)
    for a in specs:
        for b in specs:
            if a.node_id < b.node_id and (a.node_id in nic or b.node_id in nic):
                la, lb = nic.get(a.node_id, DEFAULT_NIC), nic.get(b.node_id, DEFAULT_NIC)
                links[(a.node_id, b.node_id)] = Link(max(la.rtt_ms, lb.rtt_ms), min(la.bytes_per_s, lb.bytes_per_s))
    return links


def network_from(links: Iterable[LinkStat], members: Iterable[NodeInfo] = ()) -> Network:
    """Measured links; where both ends measured a pair, the slower figure is kept. Between
    ``members`` that share memory (``shares_memory``), hidden states skip the socket: their link
    is as fast as the slower node's measured copy through shared memory."""
    pairs: dict[tuple[str, str], Link] = {}
    for stat in links:
        if stat.mib_per_s <= 0:
            continue
        key = (min(stat.src, stat.dst), max(stat.src, stat.dst))
        link = Link(stat.rtt_ms, stat.mib_per_s * (1 << 20))
        old = pairs.get(key)
        if old is not None:
            link = Link(max(old.rtt_ms, link.rtt_ms), min(old.bytes_per_s, link.bytes_per_s))
        pairs[key] = link
    infos = list(members)
    for a, b in itertools.combinations(infos, 2):
        if shares_memory(a, b):
            key = (min(a.node_id, b.node_id), max(a.node_id, b.node_id))
            rtt = pairs[key].rtt_ms if key in pairs else LOCAL_RTT_MS
            pairs[key] = Link(rtt, min(a.shm_gbps, b.shm_gbps) * 1e9)
    return Network(pairs)


# A message's round trip between two processes of one machine, before anyone measured it.
LOCAL_RTT_MS = 0.1


def shares_memory(a: NodeInfo, b: NodeInfo) -> bool:
    """Whether two nodes map the same shared memory (transport/shared_memory.py), measured their
    copies through it, and meet on one address (nodes in network namespaces of one machine
    share memory too, but were put there to cross a network)."""
    same = bool(a.machine) and a.machine == b.machine and a.shm_gbps > 0 and b.shm_gbps > 0
    return same and same_host(a.address, b.address)


def lanes(stages: Iterable[str], infos: Iterable[NodeInfo]) -> int:
    """How many of the stages (node ids, in order) can compute at once: one per GPU, however many
    nodes share it (their processes take turns on it); one per set of CPU nodes of one machine
    whose cores overlap (they take turns on the cores; a node whose cores are unknown overlaps
    every other); and one per any other node."""
    by_id = {i.node_id: i for i in infos}
    own: set[str] = set()
    shared: dict[str, list[int]] = {}  # machine -> the masks of its sets of CPU nodes (-1: every core)
    for node in stages:
        info = by_id.get(node)
        if info is not None and info.gpu:
            own.add(f"gpu {info.gpu}")
        elif info is not None and info.device == "cpu" and info.machine:
            sets = shared.setdefault(info.machine, [])
            mask = _cores(info.cpus)
            apart, merged = [], mask  # the sets it shares no core with; it and the rest, as one
            for m in sets:
                if m != -1 and mask != -1 and not m & mask:
                    apart.append(m)
                else:
                    merged = -1 if -1 in (m, merged) else merged | m
            sets[:] = [*apart, merged]
        else:
            own.add(f"node {node}")
    return len(own) + sum(len(sets) for sets in shared.values())


def _cores(mask: str) -> int:
    try:
        return int(mask, 16) or -1
    except ValueError:
        return -1


def shared_memory(infos: Iterable[NodeInfo]) -> Callable[[str, str], bool]:
    """``shares_memory`` by node id."""
    by_id = {i.node_id: i for i in infos}
    return lambda a, b: a in by_id and b in by_id and shares_memory(by_id[a], by_id[b])


@dataclass(frozen=True)
class RoomFacts:
    """What a plan of the live room is made from."""

    members: Sequence[MemberState]
    links: Sequence[LinkStat] = ()
    timings: Mapping[str, LayerTiming] | None = None  # overrides the timings inside members


def plan_room(
    model: ModelSpec,
    shape: str,
    facts: RoomFacts,
    *,
    entry: str,
    half: bool,
    budget: Budget | None = None,
    strategy: str = "optimal",
    objective: Objective | str = Objective.LATENCY,
    held: Holdings | None = None,
    auto: Mapping[str, str] | None = None,
    wire: str = "native",
) -> PlanResult:
    """Plan over the members that are alive; suspected ones get nothing. With ``held`` (the
    layers each node already holds), of plans as fast keep the one that fetches the least.
    ``auto``: how each node that lets the planner choose holds its layers (default: unquantized);
    ``wire``: the host's ``--wire``, so each hop is costed in the bytes it will carry."""
    alive = [m for m in facts.members if m.health == "alive"]
    timings = facts.timings or {}
    modes = auto or {}
    specs = [
        node_spec(model, m.info, timings.get(m.info.node_id, m.timing), shape, half=half,
                  auto=modes.get(m.info.node_id, "none"))
        for m in alive
    ]
    # The entry node goes first: it is "this machine" of the plan.
    specs.sort(key=lambda s: s.node_id != entry)
    network = dataclasses.replace(network_from(facts.links, (m.info for m in alive)), wire=wire)
    result = make_plan(model, specs, network, budget, entry=entry, strategy=strategy, objective=objective)
    if held is None:
        return result
    return prefer_held(result, model, {s.node_id: s for s in specs}, network, budget or Budget(), held)



def plan_quantizing(
    model: ModelSpec, shape: str, facts: RoomFacts, **kw: Any
) -> tuple[PlanResult, dict[str, str]]:
    """``plan_room``, with the nodes that let the planner choose (``--quantize auto``) holding
    their layers in the model's dtype while the model fits so; when it does not, in int8 one
    node at a time, the smallest first (a small node's layers are the fewest to lose precision,
    and it gains the most room for its size), then likewise in int4. Returns the plan and how
    each such node holds its layers."""
    autos = sorted(
        (m.info for m in facts.members if m.health == "alive" and m.info.quantize == "auto"),
        key=lambda i: (i.memory_bytes, i.node_id),
    )
    tries = [{i.node_id: "none" for i in autos}]
    for mode, before in (("int8", "none"), ("int4", "int8")):
        for k in range(1, len(autos) + 1):
            tries.append({i.node_id: mode if n < k else before for n, i in enumerate(autos)})
    for i, modes in enumerate(tries):
        try:
            return plan_room(model, shape, facts, auto=modes, **kw), modes
        except DoesNotFitError:
            if i == len(tries) - 1:
                raise
    raise AssertionError("unreachable")


def same_host(a: str, b: str) -> bool:
    """Whether two listen addresses (``host:port``) are one machine's: both on loopback, or one IP."""
    x, y = (addr.rpartition(":")[0].strip("[]") for addr in (a, b))
    return bool(x and y) and (x == y or (x.startswith("127.") and y.startswith("127.")) or {x, y} == {"::1"})


def same_machine(addresses: Mapping[str, str]) -> Callable[[str, str], bool]:
    """``same_host`` by node id: processes of one machine (their hidden states never cross a wire)."""
    return lambda a, b: same_host(addresses.get(a, ""), addresses.get(b, ""))


def wire_formats(
    nodes: Sequence[str], model: ModelSpec, network: Network, wire: str,
    local: Callable[[str, str], bool] = lambda a, b: False,
    shared: Callable[[str, str], bool] = lambda a, b: False,
    host: str = "",
) -> list[str]:
    """For each stage on ``nodes`` (in order), the format of its hidden states on the link to the
    next; "" between stages of one node. ``auto`` sends them through shared memory between nodes
    that map the same (``shared``), keeps the model's dtype between other processes of one
    machine (``local``: loopback's measured rate swings with the machine's load) and on a link
    nobody has measured yet (the plan after its measurement decides). The last stage's says how
    its tokens go: "local" where it shares memory with ``host`` and the first stage (it may send
    them ahead, docs/inference.md "Tokens ahead"), else "" (on the channel)."""

    def auto_native(a: str, b: str) -> bool:
        return wire == "auto" and (local(a, b) or ((a, b) not in network.links and (b, a) not in network.links))

    def hop(a: str, b: str) -> str:
        if a == b:
            return ""
        if wire == "auto" and shared(a, b):
            return "local"
        return "" if auto_native(a, b) else choose_wire(model, network.link(a, b), wire)

    hops = [hop(a, b) for a, b in itertools.pairwise(nodes)]
    last = nodes[-1] if nodes else ""
    ahead = wire == "auto" and bool(host) and shared(last, host) and shared(last, nodes[0])
    return [*hops, "local" if ahead else ""]


def to_protocol(
    result: PlanResult,
    version: int,
    model: ModelSpec,
    standbys: Sequence[tuple[str, int, int]] = (),
    *,
    network: Network | None = None,
    wire: str = "auto",
    local: Callable[[str, str], bool] = lambda a, b: False,
    shared: Callable[[str, str], bool] = lambda a, b: False,
    quantize: Mapping[str, str] | None = None,
    host: str = "",
) -> Plan:
    """The plan as the wire carries it; each stage but the last with the format its hidden states
    take over the link to the next (plan/wire.py: ``wire``, or from the link when auto); the
    stages of nodes in ``quantize`` (those that let the planner choose) with their mode."""
    stages = result.stages
    formats = wire_formats([s.node_id for s in stages], model, network or Network(), wire, local, shared, host)
    return Plan(
        version,
        model.model_id,
        model.num_layers,
        tuple(
            PlanStage(s.node_id, s.start, s.end, s.compute_ms, fmt, (quantize or {}).get(s.node_id, ""))
            for s, fmt in zip(stages, formats, strict=True)
        ),
        result.predicted_ms_per_token,
        tuple(PlanStage(n, a, b, quantize=(quantize or {}).get(n, "")) for n, a, b in standbys),
    )
