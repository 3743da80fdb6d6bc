"""The Python API, in the seed's order: create a room (or join one), the nodes join its cluster
and are benchmarked, the room plans, and answers run through the pipeline.

    async with create_room("models/llama", listen=("0.0.0.0", 7000)) as room:
        print(room.code)                        # give it to the other machines
        await room.wait_for_nodes(3)
        plan = await room.plan()                # measured, planned, every stage loaded
        result = await room.generate("Why is the sky blue?", max_tokens=100)
        api = await room.serve_http(("127.0.0.1", 8088))   # OpenAI API, dashboard, /metrics

    async with join_room("7-amber-falcon", peer=("192.168.1.20", 7000), model="models/llama") as node:
        await node.closed()                     # serve a stage until the host closes the room
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peerpipe.cluster.host_service import ClusterConfig, ClusterHost
from peerpipe.cluster.local import LocalDevice
from peerpipe.cluster.member_service import ClusterMember
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.engine.generate import GenerationResult, OnText, encode_prompt
from peerpipe.engine.sampling import SamplingParams
from peerpipe.plan import Budget
from peerpipe.protocol import Plan, RoomView
from peerpipe.room import Host, Member, RoomCode, generate_code, parse_code
from peerpipe.transport import Address

if TYPE_CHECKING:
    from peerpipe.api import ApiServer


@dataclass
class Room:
    """A room this process hosts."""

    code: RoomCode
    address: Address
    service: ClusterHost

    def view(self) -> RoomView:
        return self.service.room_view()

    async def wait_for_nodes(self, count: int, timeout_s: float = 60.0) -> None:
        """Return once ``count`` nodes (this one included) are alive in the cluster."""
        await self.service.wait_until(lambda h: len(h.view.alive()) >= count, timeout_s)

    async def plan(self, timeout_s: float = 120.0) -> Plan:
        """The current plan, once every stage has loaded it (measuring and planning first)."""
        pipeline = await self.service.ready_pipeline(timeout_s)
        return pipeline.plan

    async def generate(
        self,
        prompt: str | list[int],
        *,
        chat: bool = False,
        on_text: OnText | None = None,
        timeout_s: float = 120.0,
        **sampling: object,
    ) -> GenerationResult:
        """Run one answer through the room; ``sampling`` takes ``SamplingParams`` fields."""
        pipeline = await self.service.ready_pipeline(timeout_s)
        ids = prompt if isinstance(prompt, list) else encode_prompt(pipeline.tokenizer, prompt, chat=chat)
        return await pipeline.generate(ids, SamplingParams(**sampling), on_text)  # type: ignore[arg-type]

    async def serve_http(
        self, listen: Address = ("127.0.0.1", 8088), *, api_key: str | None = None, max_pending: int = 64
    ) -> ApiServer:
        """Serve the OpenAI API, the dashboard and /metrics for this room; ``await api.close()`` stops it."""
        from peerpipe.api import ApiServer

        api = ApiServer(self.service, api_key=api_key, max_pending=max_pending)
        await api.start(*listen)
        return api


@contextlib.asynccontextmanager
async def create_room(
    model: str | Path | None = None,
    *,
    listen: Address = ("127.0.0.1", 0),
    code: str | None = None,
    name: str = "",
    advertise: bool = False,
    expect_nodes: int = 1,
    device: str | None = None,
    dtype: str | None = None,
    memory_gb: float | None = None,
    context: int = 4096,
    sessions: int = 4,
    config: ClusterConfig | None = None,
    quick: bool = False,
) -> AsyncIterator[Room]:
    """Open a room (mDNS only when ``advertise``), measure this machine, and serve ``model``."""
    room_code = parse_code(code) if code else generate_code()
    async with Host(room_code, name=name) as host:
        address = await host.open(listen, advertise=advertise)
        local = await LocalDevice.measure(
            device, quick=quick, memory_limit_bytes=int(memory_gb * 1e9) if memory_gb else None
        )
        choice = ModelChoice.from_dir(model, dtype or local.default_dtype) if model else None
        config = config or ClusterConfig(
            expect_nodes=expect_nodes, budget=Budget(context_tokens=context, sessions=sessions)
        )
        service = ClusterHost(host, local, config, choice, address=f"{address[0]}:{address[1]}")
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(service.run(stop))
            try:
                yield Room(room_code, address, service)
            finally:
                stop.set()


@dataclass
class Node:
    """This process as a member of someone else's room."""

    service: ClusterMember
    _done: asyncio.Task[None]

    async def closed(self) -> None:
        """Wait until the host closes the room (raises if the host was lost)."""
        await asyncio.shield(self._done)


@contextlib.asynccontextmanager
async def join_room(
    code: str,
    *,
    peer: Address | None = None,
    model: str | Path | None = None,
    listen: str = "127.0.0.1",
    name: str = "",
    device: str | None = None,
    memory_gb: float | None = None,
    discovery_timeout_s: float = 10.0,
    quick: bool = False,
) -> AsyncIterator[Node]:
    """Join a room by code (by mDNS on ``listen``'s network, or at ``peer``) and serve a stage
    of ``model`` when the plan gives this node one."""
    async with Member(parse_code(code), name=name) as member:
        host = await member.join(peer, interface=listen, discovery_timeout_s=discovery_timeout_s)
        mesh = await member.listen(listen, 0)
        local = await LocalDevice.measure(
            device, quick=quick, memory_limit_bytes=int(memory_gb * 1e9) if memory_gb else None
        )
        service = ClusterMember(
            member, host.node_id, local, address=f"{mesh[0]}:{mesh[1]}", model_dir=Path(model) if model else None
        )
        stop = asyncio.Event()
        done = asyncio.create_task(service.run(stop))
        try:
            yield Node(service, done)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await done
