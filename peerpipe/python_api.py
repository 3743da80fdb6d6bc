"""The Python API, in the seed's order: create a room (or join one), the nodes join its cluster
and are benchmarked, the room plans, and answers run through the pipeline. ``peerpipe host`` and
``peerpipe join`` run exactly these two functions: this is the one place a node is assembled.

    async with create_room("models/llama", listen=("0.0.0.0", 7000)) as room:
        print(room.code)                        # give it to the other machines
        await room.wait_for_nodes(3)
        plan = await room.plan()                # measured, planned, every stage loaded
        result = await room.generate("Why is the sky blue?", max_tokens=100)
        api = await room.serve_http(("127.0.0.1", 8088))   # OpenAI API, dashboard, /metrics

    async with join_room("7-amber-falcon", peer=("192.168.1.20", 7000)) as node:
        await node.closed()                     # fetch and serve a stage until the host closes the room

A host holds three parts over one room node: the cluster service (membership, plans), its own
stage, and the inference entry (answers); one dispatcher hands each room event to its part.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerpipe.cluster.config import ClusterConfig
from peerpipe.cluster.host_service import ClusterHost
from peerpipe.cluster.local import LocalDevice
from peerpipe.cluster.member_service import ClusterMember
from peerpipe.cluster.membership import MembershipConfig
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.compute import run_compute
from peerpipe.engine.decode import GenerationResult, OnText
from peerpipe.engine.draft_model import DraftModel
from peerpipe.engine.quant import ROOM_MODES
from peerpipe.engine.quant import check_mode as check_quantize
from peerpipe.engine.speculate import DEFAULT_MAX_DRAFT, SpeculationError
from peerpipe.engine.tokenizer import Tokenizer
from peerpipe.errors import PeerpipeError
from peerpipe.inference.dataplane import DataPlane
from peerpipe.inference.entry import Entry, EntryConfig
from peerpipe.inference.errors import NotReadyError
from peerpipe.inference.runtime import StageRuntime
from peerpipe.inference.sampling import sampling_from
from peerpipe.inference.speculation import SpeculationConfig
from peerpipe.logs import Report, log_reporter
from peerpipe.models import resolve_model
from peerpipe.plan import Budget
from peerpipe.protocol import Plan, RoomView
from peerpipe.room import Host, Member, PeerInfo, RoomCode, generate_code, parse_code
from peerpipe.transport import Address
from peerpipe.transport.loop import busy_poll_window, polls_ahead
from peerpipe.weights import NodeWeights

if TYPE_CHECKING:
    from peerpipe.api import ApiServer

log = logging.getLogger(__name__)


@dataclass
class Room:
    """A room this process hosts: its cluster service and, with a model, its inference entry."""

    code: RoomCode
    address: Address
    cluster: ClusterHost
    inference: Entry | None
    model_path: Path | None = None
    _browsers: _BrowserHost | None = dataclasses.field(default=None, repr=False)

    def view(self) -> RoomView:
        return self.cluster.room_view()

    async def rotate_code(self) -> RoomCode:
        """Give the room a fresh code (someone was guessing the old one): only the new code
        admits from now on; members already in stay and learn it."""
        self.code = await self.cluster.rotate_code()
        return self.code

    def _entry(self) -> Entry:
        if self.inference is None:
            raise NotReadyError(self.cluster.why_not_ready())
        return self.inference

    async def wait_for_nodes(self, count: int, timeout_s: float = 60.0) -> None:
        """Return once ``count`` nodes (this one included) are alive in the cluster."""
        await self.cluster.wait_until(lambda h: len(h.view.alive()) >= count, timeout_s)

    async def plan(self, timeout_s: float = 120.0, *, fail_fast: bool = False) -> Plan:
        """The current plan, once every stage has loaded it (measuring and planning first). With
        ``fail_fast``, a room that tried to plan and could not (no node could load its stage, or
        the model does not fit) raises ``NotReadyError`` with the reason at once."""
        pipeline = await self._entry().wait_ready(timeout_s, fail_fast=fail_fast)
        return pipeline.plan

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        chat: bool = False,
        system: str | None = None,
        on_text: OnText | None = None,
        timeout_s: float = 120.0,
        speculate: str = "",
        **sampling: Any,
    ) -> GenerationResult:
        """Run one answer through the room; ``sampling`` takes the ``Sampling`` record's fields
        (left out: the model's defaults; ``max_tokens``: the rest of the context); ``speculate``
        (off, ngram, draft) overrides the room's drafting for this answer."""
        record = sampling_from(sampling, strict=True)
        return await self._entry().generate(
            prompt, record, on_text, chat=chat, system=system, timeout_s=timeout_s, speculate=speculate
        )

    async def serve_http(
        self, listen: Address = ("127.0.0.1", 8088), *, api_key: str | None = None, max_pending: int = 64,
        https: bool = False, cors: Sequence[str] = (),
    ) -> ApiServer:
        """Serve the OpenAI API, the dashboard and /metrics for this room; ``await api.close()`` stops it.
        ``cors``: origins whose web pages may call the API (docs/api.md)."""
        from peerpipe.api import ApiServer

        api = ApiServer(
            self.cluster, self.inference, api_key=api_key, max_pending=max_pending, browsers=self.browser_host(),
            cors=cors,
        )
        await api.start(*listen, https=https)
        return api

    def browser_host(self) -> _BrowserHost | None:
        """What admits browser tabs that lend their GPU (docs/webgpu.md); None without a model."""
        if self.inference is None:
            return None
        if self._browsers is None:
            self._browsers = _BrowserHost(self)
        return self._browsers


def _planned(quantize: str, model: str | Path | None) -> str:
    """What the planner counts a node's layers in: ``keep`` as the widest type the GGUF stores."""
    if quantize != "keep":
        return quantize
    from peerpipe.engine.loader import keep_width

    return keep_width(resolve_model(model) if model is not None else None)


class _BrowserHost:
    """Browser tabs lending their GPU (docs/webgpu.md): each authenticated tab becomes a member
    of this room, run here, whose stage computes on the tab (``webgpu:browser-N``). Hidden states
    reach it through this host, so its measured step time includes that hop."""

    def __init__(self, room: Room) -> None:
        from peerpipe.webgpu.browser_link import BrowserSecrets

        self.room = room
        self.secrets = BrowserSecrets()
        self._count = 0

    async def serve(self, session: Any) -> None:
        from peerpipe.webgpu.load import register_executor
        from peerpipe.webgpu.remote import RemoteExecutor

        self._count += 1
        device = f"webgpu:browser-{self._count}"
        register_executor(device, RemoteExecutor(session))
        host, port = self.room.address
        peer = ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port)

        def note(text: str) -> None:
            with contextlib.suppress(PeerpipeError):
                session.post({"op": "note", "text": text[:300]})

        try:
            async with join_room(
                str(self.room.code), peer=peer, model=self.room.model_path, name=f"browser-{self._count}",
                device=device, quick=True, report=note, stop=session.closed,
            ) as node:
                await node.closed()
        except PeerpipeError as exc:
            log.warning("browser node %s left: %s", device, exc)
        finally:
            register_executor(device, None)


@contextlib.asynccontextmanager
async def _task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """A task group whose body's own error comes out as itself (a plain ``TaskGroup`` wraps it in
    an ExceptionGroup, which would hide a ``ListenError`` from the command line)."""
    error: Exception | None = None
    async with asyncio.TaskGroup() as tg:
        try:
            yield tg
        except Exception as exc:
            error = exc
    if error is not None:
        raise error


def _corrupting() -> bool:
    """The test hook that makes this node send corrupt weights (tests/weights: caught and refetched)."""
    return os.environ.get("PEERPIPE_TEST_CORRUPT_WEIGHTS") == "1"


async def _measure(device: str | None, memory_gb: float | None, quick: bool) -> LocalDevice:
    limit = int(memory_gb * 1e9) if memory_gb else None
    return await LocalDevice.measure(device, quick=quick, memory_limit_bytes=limit)


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
    entry_config: EntryConfig | None = None,
    quick: bool = False,
    measured: LocalDevice | None = None,
    report: Report | None = None,
    on_open: Callable[[RoomCode, Address], None] | None = None,
    speculate: str | None = None,
    speculate_max: int | None = None,
    draft: str | Path | None = None,
    quantize: str = "none",
) -> AsyncIterator[Room]:
    """Open a room (mDNS only when ``advertise``), measure this machine, and serve ``model``.
    ``on_open`` hears the code and address as soon as the room listens, before measuring;
    ``measured`` is this machine already measured (``device``, ``memory_gb`` and ``quick`` unused).

    Answers draft tokens for the stages to verify (docs/speculative.md): ``speculate`` is off,
    ngram (prompt lookup, the default) or draft (with the small model ``draft``, run here; the
    default once one is given), ``speculate_max`` the most tokens a step drafts (None: 7). ``quantize`` is
    as for ``join_room``, for the host's own stage."""
    check_quantize(quantize, ROOM_MODES)
    room_code = parse_code(code) if code else generate_code()
    model = resolve_model(model) if model else None
    draft = resolve_model(draft) if draft else None
    speculation = SpeculationConfig(speculate or ("draft" if draft else "ngram"), speculate_max or DEFAULT_MAX_DRAFT)
    if speculation.mode == "draft" and draft is None:
        raise SpeculationError("speculate=draft needs a draft model (--draft DIR, or austen-draft for the bundled model)")
    config = config or ClusterConfig(expect_nodes=expect_nodes, budget=Budget(context_tokens=context, sessions=sessions))
    async with Host(room_code, name=name) as node:
        address = await node.open(listen, advertise=advertise)
        if on_open is not None:
            on_open(room_code, address)
        local = dataclasses.replace(measured or await _measure(device, memory_gb, quick), quantize=_planned(quantize, model))
        choice = ModelChoice.from_dir(model, dtype or local.default_dtype) if model else None
        plane = DataPlane(
            node, no_entry="the host serves no model: start it with --model DIR",
            busy_poll_s=busy_poll_window(local.caps.torch_device), poll_ahead=polls_ahead(local.caps.torch_device),
        )
        stage = None
        if choice is not None:
            weights = plane.weights = NodeWeights(plane.send, choice.path, report=report, corrupt=_corrupting())
            weights.server.busy = plane.answering
            choice = dataclasses.replace(choice, manifest_id=await weights.local_id())
            stage = StageRuntime(
                node.node_id, node.name, choice.path, device=local.caps.torch_device,
                memory_bytes=local.offered_bytes, send=plane.send, report=report, quantize=quantize, weights=weights,
            )
        cluster = ClusterHost(
            node, local, config, choice, stage=stage, address=f"{address[0]}:{address[1]}", report=report
        )
        entry = None
        if choice is not None and cluster.rollout is not None:
            settings = dataclasses.replace(
                entry_config or EntryConfig(), sessions=config.budget.sessions, max_seq=cluster.rollout.max_seq,
                speculation=speculation,
            )
            drafter = None
            if draft is not None:
                drafter = await run_compute(
                    DraftModel.load, draft, Tokenizer.from_dir(choice.path), vocab_limit=choice.config.vocab_size,
                    sessions=settings.sessions, max_seq=settings.max_seq, device=local.caps.torch_device,
                    dtype=choice.dtype,
                )
            entry = Entry(
                choice.path, host_id=node.node_id, send=plane.send_steps, config=settings,
                why_not_ready=cluster.why_not_ready, on_stall=cluster.check_stalled, report=report, draft=drafter,
            )
            cluster.rollout.on_ready = entry.use_plan
            cluster.rollout.on_replan = entry.replanned
            cluster.rollout.on_cannot_plan = entry.cannot_plan
            cluster.tasks = entry.task_infos
            cluster.pace = entry.measured_ms
        plane.stage, plane.entry = stage, entry
        stop = asyncio.Event()
        try:
            async with _task_group() as tg:
                tg.create_task(cluster.run(stop))
                if stage is not None:
                    tg.create_task(stage.run(stop))
                dispatcher = tg.create_task(plane.run(cluster.on_event))
                try:
                    yield Room(room_code, address, cluster, entry, choice.path if choice else None)
                finally:
                    if entry is not None:
                        entry.close("the host closed the room")
                    stop.set()
                    dispatcher.cancel()
        finally:
            await node.leave("the host closed the room")


@dataclass
class Node:
    """This process as a member of someone else's room."""

    cluster: ClusterMember
    stage: StageRuntime
    _ended: asyncio.Future[None]

    async def closed(self) -> None:
        """Wait until this node is out of the room: the host closed it (or was lost: that raises),
        or the ``stop`` given to ``join_room`` was set."""
        await asyncio.shield(self._ended)


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
    membership: MembershipConfig | None = None,
    quick: bool = False,
    measured: LocalDevice | None = None,
    report: Report | None = None,
    stop: asyncio.Event | None = None,
    on_join: Callable[[PeerInfo], None] | None = None,
    on_new_code: Callable[[RoomCode], None] | None = None,
    quantize: str = "none",
    weights_dir: Path | None = None,
) -> AsyncIterator[Node]:
    """Join a room by code (by mDNS on ``listen``'s network, or at ``peer``) and serve a stage
    of ``model`` when the plan gives this node one, until ``stop`` is set, the block ends or the
    host closes the room. ``on_join`` hears of the host as soon as the handshake is done;
    ``measured`` is as for ``create_room``; ``quantize`` (int8, int4; auto: as the plan says) holds this node's layers'
    matrices in fewer bits, so it takes more layers (docs/quantization.md). Without ``model`` (or
    with another copy of it) the node fetches its layers from peers into ``weights_dir``
    (default: the cache, ``peerpipe models`` lists them; docs/weights.md)."""
    check_quantize(quantize, ROOM_MODES)
    leave = asyncio.Event()  # set by ``stop`` or by the end of the block; the caller's event is theirs
    async with Member(parse_code(code), name=name) as node:
        def waiting(seconds: float) -> None:
            (report or log_reporter(log))(
                f"the host slows down joins from this address after wrong codes: waiting {max(seconds, 1):.0f} s for it"
            )

        host = await node.join(peer, interface=listen, discovery_timeout_s=discovery_timeout_s, on_wait=waiting)
        if on_join is not None:
            on_join(host)
        mesh = await node.listen(listen, 0)
        folder = resolve_model(model) if model else None
        local = dataclasses.replace(measured or await _measure(device, memory_gb, quick), quantize=_planned(quantize, folder))
        device = local.caps.torch_device
        plane = DataPlane(node, busy_poll_s=busy_poll_window(device), poll_ahead=polls_ahead(device))
        plane.weights = NodeWeights(plane.send, folder, report=report, corrupt=_corrupting(), cache=weights_dir)
        plane.weights.server.busy = plane.answering
        await plane.weights.local()  # hashed before the first plan: peers may fetch from it at once
        stage = StageRuntime(
            node.node_id, node.name, folder, device=local.caps.torch_device, memory_bytes=local.offered_bytes,
            send=plane.send, report=report, quantize=quantize, weights=plane.weights,
        )
        plane.stage = stage
        cluster = ClusterMember(
            node, host.node_id, local, stage, address=f"{mesh[0]}:{mesh[1]}", membership=membership, report=report
        )
        cluster.on_new_code = on_new_code
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stage_stop = asyncio.Event()

        async def member() -> None:
            # The member's end is the node's: it stops the stage and the dispatcher, and its error
            # (the host was lost) reaches whoever awaits closed(), not the task group.
            try:
                await cluster.run(leave)
            except PeerpipeError as exc:
                ended.set_exception(exc)
            else:
                ended.set_result(None)
            finally:
                stage_stop.set()
                dispatcher.cancel()

        async def relay(outer: asyncio.Event) -> None:
            await outer.wait()
            leave.set()

        async with _task_group() as tg:
            tg.create_task(member())  # first: it is ready for the host's messages before they flow
            tg.create_task(stage.run(stage_stop))
            dispatcher = tg.create_task(plane.run(cluster.on_event))
            relaying = tg.create_task(relay(stop)) if stop is not None else None
            try:
                yield Node(cluster, stage, ended)
            finally:
                leave.set()
                if relaying is not None:
                    relaying.cancel()
        if ended.done() and not ended.cancelled():
            ended.exception()  # retrieved: closed() reports it to those who asked
        await node.leave("member left")
