"""Host and member services in one process over real loopback sockets."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from peerpipe.cluster.config import ClusterConfig
from peerpipe.cluster.host_service import ClusterHost
from peerpipe.cluster.local import LocalDevice
from peerpipe.cluster.member_service import ClusterMember
from peerpipe.cluster.membership import MembershipConfig
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.inference.dataplane import DataPlane
from peerpipe.inference.stage_server import StageStats
from peerpipe.plan import Budget, stage_memory
from peerpipe.protocol import DistributionPlan, Plan
from peerpipe.room import Host, Member, parse_code

T = TypeVar("T")
CODE = parse_code("4-quiet-harbour")
FAST = MembershipConfig(heartbeat_s=0.2, suspect_after_beats=3, dead_after_s=1.5)


def arun(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def device(warm_bench: None) -> LocalDevice:
    return asyncio.run(LocalDevice.measure("cpu", quick=True))


class PlanTaker:
    """This node's stage as the cluster sees it (``LocalStage``): records the plans it is given."""

    def __init__(self) -> None:
        self.loading = False
        self.stats = StageStats()
        self.plans: list[Plan] = []

    async def apply(self, message: DistributionPlan, host_id: str) -> str:
        self.plans.append(message.plan)
        return ""


async def serve(node, service, stop: asyncio.Event) -> None:
    """Run a cluster service with its node's dispatcher, as a host or member process does."""
    async with asyncio.TaskGroup() as tg:
        dispatcher = tg.create_task(DataPlane(node).run(service.on_event))
        await service.run(stop)
        dispatcher.cancel()


async def start_member(
    stack, name: str, addr, device: LocalDevice, stage: PlanTaker | None = None
) -> tuple[ClusterMember, asyncio.Event, asyncio.Task]:
    member = await stack.enter_async_context(Member(CODE, name=name))
    mesh = await member.listen("127.0.0.1", 0)
    host_peer = await member.join(addr)
    service = ClusterMember(
        member, host_peer.node_id, device, stage or PlanTaker(), address=f"{mesh[0]}:{mesh[1]}", membership=FAST
    )
    stop = asyncio.Event()
    return service, stop, asyncio.create_task(serve(member, service, stop))


def test_room_of_three_plans_acks_measures_and_replans_on_leave(device: LocalDevice, tiny_model_dir) -> None:
    model = ModelChoice.from_dir(tiny_model_dir("llama"), dtype="float32")
    taker = PlanTaker()
    async def main() -> None:
        import contextlib

        async with contextlib.AsyncExitStack() as stack:
            host_node = await stack.enter_async_context(Host(CODE, name="host"))
            addr = await host_node.open(("127.0.0.1", 0), advertise=False)
            budget = Budget(context_tokens=64)
            config = ClusterConfig(membership=FAST, replan_debounce_s=0.2, expect_nodes=3, budget=budget)
            # No node may hold the whole model, so the plan needs two stages or more.
            half = stage_memory(model.spec, budget, 0, model.config.n_layers - 1)
            small = dataclasses.replace(device, memory_limit_bytes=int(half / (1 - budget.headroom)) + 1)
            host = ClusterHost(host_node, small, config, model, stage=PlanTaker())
            host_stop = asyncio.Event()
            host_task = asyncio.create_task(serve(host_node, host, host_stop))
            a, a_stop, a_task = await start_member(stack, "a", addr, small, taker)
            b, b_stop, b_task = await start_member(stack, "b", addr, small, taker)

            def planned_for_three(h: ClusterHost) -> bool:
                return h.rollout is not None and h.rollout.plan is not None and len(h.view.alive()) == 3 and len(h.rollout.acked) >= 1
            await host.wait_until(planned_for_three, 30)
            view = host.room_view()
            assert {m.info.name for m in view.members} == {"host", "a", "b"}
            # Every node timed a layer of the model, and every pair measured its link.
            assert {m.info.node_id for m in view.members if m.timing} == {m.info.node_id for m in view.members}
            pairs = {(link.src, link.dst) for link in view.links}
            ids = [m.info.node_id for m in view.members]
            assert all((x, y) in pairs for x in ids for y in ids if x != y), pairs
            assert all(link.rtt_ms > 0 and link.mib_per_s > 1 for link in view.links)
            assert host.rollout is not None
            plan = host.rollout.plan
            assert plan is not None and plan.stages[0].start == 0 and plan.stages[-1].end == model.config.n_layers
            assert len(plan.stages) >= 2
            # Every node acknowledges the plan, stage or not.
            await host.wait_until(lambda h: h.rollout.acked >= set(ids), 10)
            assert a.plan == plan == b.plan and plan in taker.plans

            # b leaves politely: gone at once, and the room is planned again without it.
            version = plan.version
            b_stop.set()
            await b_task
            await host.wait_until(lambda h: b.node.node_id not in h.view.ids, 5)
            await host.wait_until(lambda h: h.rollout.plan is not None and h.rollout.plan.version > version, 10)
            assert b.node.node_id not in {s.node_id for s in host.rollout.plan.stages}
            a_stop.set()
            await a_task
            host_stop.set()
            await host_task

    arun(main())


def test_silent_member_is_suspected_then_dropped(device: LocalDevice) -> None:
    async def main() -> None:
        import contextlib

        async with contextlib.AsyncExitStack() as stack:
            host_node = await stack.enter_async_context(Host(CODE, name="host"))
            addr = await host_node.open(("127.0.0.1", 0), advertise=False)
            host = ClusterHost(host_node, device, ClusterConfig(membership=FAST))
            host_stop = asyncio.Event()
            host_task = asyncio.create_task(serve(host_node, host, host_stop))
            a, _, a_task = await start_member(stack, "a", addr, device)
            a_id = a.node.node_id
            await host.wait_until(lambda h: a_id in h.view.ids, 5)
            # Freeze a's heartbeats but keep its connection open: only the heartbeats tell.
            a_task.cancel()
            loop = asyncio.get_running_loop()
            silent_at = loop.time()
            await host.wait_until(lambda h: (m := h.view.get(a_id)) is not None and m.suspected, 5)
            suspected_after = loop.time() - silent_at
            await host.wait_until(lambda h: a_id not in h.view.ids, 5)
            dead_after = loop.time() - silent_at
            assert FAST.suspect_s * 0.5 < suspected_after < FAST.dead_after_s
            assert FAST.suspect_s < dead_after < FAST.dead_after_s + 1.0
            host_stop.set()
            await host_task

    arun(main())
