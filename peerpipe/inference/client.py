"""Ask a room's host for an answer: connect by code (as an observer), send a generate-request,
stream the text, return the generate-done. Interrupting the wait cancels the request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from peerpipe.inference.errors import InferenceError
from peerpipe.protocol import Cancel, GenerateDone, GenerateRequest, GenerateText, RoomView
from peerpipe.room import LINK_ERRORS, MessageFrom, PeerLeft, RoomCode, RoomNode
from peerpipe.transport import Address

SAY_WAIT_S = 0.5  # how long a not-ready view waits to be said: the host's first answer may come first


def not_ready(view: RoomView) -> str:
    """Why the room's view says answers would wait now; "" when every stage has its plan."""
    if view.plan is None:
        return "the room has no plan yet"
    names = {m.info.node_id: m.info.name for m in view.members}
    loading = [s.node_id for s in view.plan.stages if s.node_id not in view.acked]
    if loading:
        return "stages are loading: " + ", ".join(names.get(n, n[:8]) for n in loading)
    return ""


async def remote_generate(
    code: RoomCode,
    host: Address,
    request: GenerateRequest,
    on_text: Callable[[str], None] | None = None,
    *,
    timeout_s: float = 600.0,
    on_wait: Callable[[str], None] | None = None,
) -> GenerateDone:
    """Send ``request`` and return its generate-done. The host holds it until the room is ready
    (within ``request.wait_s``); ``on_wait`` hears, once, why the room's view says it waits."""
    async with RoomNode(code, name="client") as node:
        peer = await node.dial(host)
        await node.send(peer.node_id, request)
        waiting_said = False
        saying: asyncio.TimerHandle | None = None  # the wait, said unless the host answers first
        try:
            async with asyncio.timeout(timeout_s):
                async for event in node.events():
                    if isinstance(event, MessageFrom):
                        message = event.message
                        if isinstance(message, GenerateText) and message.request_id == request.request_id:
                            waiting_said = True  # the answer flows: older views say nothing new
                            if saying is not None:
                                saying.cancel()
                            if on_text is not None:
                                on_text(message.text)
                        elif isinstance(message, GenerateDone) and message.request_id == request.request_id:
                            return message
                        elif isinstance(message, RoomView) and not waiting_said and (why := not_ready(message)):
                            waiting_said = True
                            if on_wait is not None:  # (a host refusing at once, no model say, makes it moot)
                                saying = asyncio.get_running_loop().call_later(SAY_WAIT_S, on_wait, why)
                    elif isinstance(event, PeerLeft) and event.peer.node_id == peer.node_id:
                        raise InferenceError(f"the host left before the answer was done: {event.reason}")
        except TimeoutError:
            raise InferenceError(f"no complete answer within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            with contextlib.suppress(*LINK_ERRORS, TimeoutError):
                async with asyncio.timeout(2.0):
                    await node.send(peer.node_id, Cancel(request.request_id))
            raise
        finally:
            if saying is not None:
                saying.cancel()
        raise InferenceError("the connection ended before the answer")
