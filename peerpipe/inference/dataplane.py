"""A node's data plane, and the one dispatcher of its room events (host and members alike).

Compute requests, results, errors, cancels and clients' generate-requests are handled here; every
other event goes on to the node's control plane (the cluster service) as it came. ``send`` is the
data plane's way out: to a peer through the room, to this node's own stage or answers without
touching the network.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from peerpipe.compute import computing
from peerpipe.errors import PeerpipeError
from peerpipe.inference import trace
from peerpipe.inference.entry import Entry
from peerpipe.inference.runtime import StageRuntime
from peerpipe.protocol import (
    Cancel,
    ComputeBatch,
    ComputeError,
    ComputeRequest,
    ComputeResult,
    GenerateDone,
    GenerateRequest,
    ManifestReply,
    ManifestRequest,
    Message,
    WeightReply,
    WeightRequest,
)
from peerpipe.room import MessageFrom, PeerLeft, RoomEvent, RoomNode
from peerpipe.transport.loop import BusyPoll
from peerpipe.weights import NodeWeights

log = logging.getLogger(__name__)
DATA_PLANE = (ComputeRequest, ComputeResult, ComputeBatch, ComputeError, Cancel, GenerateRequest)
WEIGHTS = (ManifestRequest, ManifestReply, WeightRequest, WeightReply)
Control = Callable[[RoomEvent], Awaitable[None]]
COALESCE_BYTES = 64 << 10  # steps up to this size wait for the loop's turn to go with others
COALESCE_STEPS = 256  # at most this many in one compute-batch


class DataPlane:
    """``stage`` and ``entry`` are set once made (each needs ``send``); a member has no entry."""

    def __init__(
        self, node: RoomNode, *, no_entry: str = "this node is not the room's host", busy_poll_s: float = 0.0,
        poll_ahead: bool = False,
    ) -> None:
        self.node = node
        # Polls while hidden states pass (GPU nodes), or just before they are due (pinned CPU nodes).
        self.busy_poll = BusyPoll(busy_poll_s, pause=computing, ahead=poll_ahead)
        self.stage: StageRuntime | None = None
        self.entry: Entry | None = None
        self.weights: NodeWeights | None = None
        self.no_entry = no_entry  # what a client asking this node for an answer is told
        self.last_compute = -1e9  # monotonic time hidden states last passed through this node
        # Steps on their way to a peer, sent together at the loop's next turn (see send()).
        self._pending: dict[str, tuple[list[ComputeRequest], asyncio.Future[None]]] = {}
        self._writes: set[asyncio.Task[None]] = set()

    def answering(self, within_s: float = 10.0) -> bool:
        """Whether answers passed through this node lately (weights then yield to them: answers
        come in bursts, so a short pause between two does not count as the end)."""
        return time.monotonic() - self.last_compute < within_s

    async def run(self, control: Control) -> None:
        """Dispatch the node's events until cancelled."""
        async with asyncio.TaskGroup() as tg:
            polling = tg.create_task(self.busy_poll.run())
            try:
                await self._dispatch(control, tg)
            finally:
                polling.cancel()

    async def _dispatch(self, control: Control, tg: asyncio.TaskGroup) -> None:
        async for event in self.node.events():
            if isinstance(event, MessageFrom) and isinstance(event.message, DATA_PLANE):
                self._on_message(event.peer.node_id, event.message, tg)
                continue
            if isinstance(event, MessageFrom) and isinstance(event.message, WEIGHTS):
                self._on_weights(event.peer.node_id, event.message, tg)
                continue
            if isinstance(event, PeerLeft) and self.weights is not None:
                self.weights.fetcher.peer_left(event.peer.node_id)
            if isinstance(event, PeerLeft) and self.entry is not None:
                self.entry.node_lost(event.peer.node_id, event.reason)
            await control(event)

    def _on_message(self, peer: str, message: Message, tg: asyncio.TaskGroup) -> None:
        if isinstance(message, ComputeBatch):
            for step in (*message.requests, *message.results):
                self._on_message(peer, step, tg)
            return
        if isinstance(message, ComputeRequest | ComputeResult):
            self._passing()
            self.busy_poll.arrived()  # (a window poll starts over)
        if isinstance(message, ComputeRequest):
            trace.mark("in", message.task_id, message.start_pos, self.node.name)
            # From the previous stage or, for the first stage, the host.
            if self.stage is None or not self.stage.submit(message):
                error = ComputeError(
                    message.task_id, f"{self.node.name} holds no stage of this plan", message.plan_version, message.start_pos
                )
                tg.create_task(self._send_quietly(peer, error))
        elif isinstance(message, Cancel):
            # At the host a peer's cancel is a client's (stages get the host's through send()).
            if self.entry is not None:
                self.entry.cancel(message.task_id)
            elif self.stage is not None:
                self.stage.submit(message)
        elif isinstance(message, ComputeResult | ComputeError):
            self._deliver(peer, message)
        elif isinstance(message, GenerateRequest):
            if self.entry is not None:
                tg.create_task(self.entry.serve(peer, message))
            else:
                done = GenerateDone(message.request_id, "error", "", (), (), 0.0, 0.0, error=self.no_entry)
                tg.create_task(self._send_quietly(peer, done))

    def _on_weights(
        self, peer: str, message: ManifestRequest | ManifestReply | WeightRequest | WeightReply, tg: asyncio.TaskGroup
    ) -> None:
        if isinstance(message, ManifestReply | WeightReply):
            if self.weights is not None:
                self.weights.fetcher.on_reply(peer, message)
        elif self.weights is not None:
            tg.create_task(self.weights.server.serve(peer, message))
        elif isinstance(message, ManifestRequest):
            tg.create_task(self._send_quietly(peer, ManifestReply(message.request_id, error="this node shares no weights")))
        else:
            tg.create_task(self._send_quietly(peer, WeightReply(message.request_id, error="this node shares no weights")))

    def _deliver(self, peer: str, message: ComputeResult | ComputeError) -> None:
        if self.entry is not None:
            self.entry.pipeline.deliver(peer, message)

    async def send_steps(self, node_id: str, message: Message) -> None:
        """``send`` for the host's answers: each sends its next step as its token comes back, so
        the steps of a batch's answers come one after another in one turn of the loop; they go
        together, as one compute-batch, at the end of that turn. (Sending the first at once cost
        stages a second forward per round: it started before the rest came.) A lone answer's decode
        step goes at once: no other step can join it, and the turns it would wait cost it on every
        token. (A prompt still waits: answers started together start one after another, the first
        alone for a moment, and their prompts share a forward.)"""
        if isinstance(message, ComputeRequest) and node_id != self.node.node_id:
            self._passing()
            self.busy_poll.sent()
            prompt = message.session is not None or message.partial
            if not prompt and self.entry is not None and self.entry.pipeline.running <= 1:
                await self.node.send(node_id, message)
            else:
                await self._coalesced(node_id, message)
        else:
            await self.send(node_id, message)

    async def send(self, node_id: str, message: Message) -> None:
        """Send on the data plane; to this node itself without touching the network."""
        if isinstance(message, ComputeRequest | ComputeResult | ComputeBatch):
            self._passing()
            if node_id != self.node.node_id:
                self.busy_poll.sent()
            else:  # no input is awaited from itself; a window poll starts over all the same
                self.busy_poll.touch()
        if isinstance(message, ComputeBatch) and node_id == self.node.node_id:
            for step in (*message.requests, *message.results):
                await self.send(node_id, step)
        elif node_id != self.node.node_id:
            await self.node.send(node_id, message)
        elif isinstance(message, ComputeRequest | Cancel):
            if isinstance(message, ComputeRequest):
                trace.mark("in", message.task_id, message.start_pos, self.node.name)
            if (self.stage is None or not self.stage.submit(message)) and isinstance(message, ComputeRequest):
                error = ComputeError(message.task_id, f"{self.node.name} holds no stage", message.plan_version, message.start_pos)
                self._deliver(node_id, error)
        elif isinstance(message, ComputeResult | ComputeError):
            self._deliver(node_id, message)

    def _passing(self) -> None:
        """A step passes through this node: weights yield to answers (callers tell the poll)."""
        self.last_compute = time.monotonic()

    async def _coalesced(self, node_id: str, request: ComputeRequest) -> None:
        if request.input_tensor.nbytes > COALESCE_BYTES:  # a prompt: the channel chunks it alone
            await self.node.send(node_id, request)
            return
        pending = self._pending.get(node_id)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = self._pending[node_id] = ([], loop.create_future())
            pending[1].add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, if by nobody else
            loop.call_soon(self._flush, node_id, pending)
        pending[0].append(request)
        if len(pending[0]) >= COALESCE_STEPS:
            self._flush(node_id, pending)
        await asyncio.shield(pending[1])  # a sender cancelled meanwhile does not cancel the others'

    def _flush(self, node_id: str, pending: tuple[list[ComputeRequest], asyncio.Future[None]]) -> None:
        if self._pending.get(node_id) is not pending:
            return  # flushed already (it was full)
        del self._pending[node_id]
        requests, done = pending
        message: Message = requests[0] if len(requests) == 1 else ComputeBatch(tuple(requests))

        async def write() -> None:
            try:
                await self.node.send(node_id, message)
            except BaseException as exc:  # every sender of the batch learns it
                done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                done.set_result(None)

        task = asyncio.get_running_loop().create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _send_quietly(self, peer: str, message: Message) -> None:
        try:
            await self.node.send(peer, message)
        except PeerpipeError as exc:  # the peer left: its PeerLeft event says so
            log.info("cannot answer %s: %s", peer[:8], exc)
