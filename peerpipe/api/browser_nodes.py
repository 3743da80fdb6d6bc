"""Browser nodes on the host's HTTP port: the page a tab runs (``/node``), the WGSL it runs
(``/webgpu/kernels.wgsl``, the same file Python's WebGPU stages compile), one-time join links
with a QR code for the dashboard, and the WebSocket a tab dials (``/api/browser-node``).

The socket's handshake is ``webgpu/browser_link.py``'s; once the tab has proven its secret, the
session goes to the host's ``BrowserHost`` (python_api wires it), which runs a room member for
the tab until the socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
from importlib import resources
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from peerpipe.api.addresses import is_loopback
from peerpipe.api.errors import ApiError
from peerpipe.room.discovery import default_lan_ip
from peerpipe.webgpu.browser_link import BrowserLinkError, BrowserSecrets, Sealer, b64, keys, parse_hello
from peerpipe.webgpu.remote import BrowserSession

log = logging.getLogger(__name__)
STATIC = resources.files("peerpipe.api") / "static"
HANDSHAKE_S = 20.0
MAX_FRAME = 64 << 20
MAX_TAB_MEMORY = 16 << 30  # browsers report at most 8 GB of device memory; a tab offers half


class BrowserHost(Protocol):
    secrets: BrowserSecrets

    async def serve(self, session: BrowserSession) -> None:
        """Run a room member computing on ``session``'s tab until the tab leaves."""
        ...


def qr_svg(text: str) -> str:
    """``text`` as a QR code, an SVG of dark modules (for a phone's camera)."""
    import qrcode

    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(text)
    qr.make(fit=True)
    matrix = qr.get_matrix()
    n = len(matrix)
    path = "".join(f"M{x},{y}h1v1h-1z" for y, row in enumerate(matrix) for x, dark in enumerate(row) if dark)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {n} {n}" shape-rendering="crispEdges">'
            f'<rect width="{n}" height="{n}" fill="#fff"/><path d="{path}" fill="#000"/></svg>')


def tab_facts(auth: dict[str, Any]) -> dict[str, Any]:
    """What a tab says of itself, within what a browser can say: it is authenticated, but a page
    edited in its console could offer the planner memory no tab has."""
    def number(key: str, top: int) -> int | None:
        value = auth.get(key)
        return min(max(value, 0), top) if isinstance(value, int) and not isinstance(value, bool) else None

    adapter = auth.get("adapter")
    return {
        "adapter": adapter[:200] if isinstance(adapter, str) else "WebGPU adapter",
        "f16": auth.get("f16") is True,
        "max_binding": number("max_binding", 1 << 40),
        "memory": number("memory", MAX_TAB_MEMORY),
    }


class BrowserRoutes:
    OPEN = ("/node", "/webgpu/", "/api/browser-node")  # the secret, not the API key, guards these

    def __init__(self, host: BrowserHost | None) -> None:
        self.host = host
        self.bound: tuple[str, int] | None = None  # where the HTTP server listens (set when it starts)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/node", self._page),
            web.get("/webgpu/kernels.wgsl", self._kernels),
            web.post("/api/browser-link", self._new_link),
            web.get("/api/browser-node", self._socket),
        ]

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=(STATIC / "node.html").read_text(), content_type="text/html")

    async def _kernels(self, request: web.Request) -> web.Response:
        source = resources.files("peerpipe.webgpu").joinpath("kernels.wgsl").read_text()
        return web.Response(text=source, content_type="text/plain")

    async def _new_link(self, request: web.Request) -> web.Response:
        if self.host is None:
            raise ApiError(404, "this room takes no browser nodes (its host serves no model)", code="no_browser_nodes")
        secret = self.host.secrets.new_link()
        where, local_only = self._link_host(request)
        url = f"{request.scheme}://{where}/node#k={b64(secret)}"
        return web.json_response({"url": url, "qr_svg": qr_svg(url), "local_only": local_only})

    def _link_host(self, request: web.Request) -> tuple[str, bool]:
        """Where another device reaches this server, and whether only this machine can. A dashboard
        opened at localhost would otherwise send a phone to its own localhost."""
        if request.url.host is None or not is_loopback(request.url.host) or self.bound is None:
            return request.host, False
        ip, port = self.bound
        if is_loopback(ip):
            return request.host, True
        if ipaddress.ip_address(ip).is_unspecified:
            ip = default_lan_ip()
            if is_loopback(ip):
                return request.host, True
        return (f"[{ip}]" if ":" in ip else ip) + f":{port}", False

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=30.0)
        await ws.prepare(request)
        peer = request.remote or "?"
        try:
            session = await self._handshake(ws)
        except BrowserLinkError as exc:
            log.info("browser node from %s refused: %s", peer, exc)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(json.dumps({"error": str(exc)}))
            await ws.close()
            return ws
        except (TimeoutError, ConnectionError, RuntimeError):
            await ws.close()
            return ws
        log.info("browser node from %s joined: %s", peer, session.facts.get("adapter", "?"))
        assert self.host is not None
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(session.pump())
            member = tg.create_task(self.host.serve(session))  # returns once the session closes
            member.add_done_callback(lambda _: tg.create_task(ws.close()) if not ws.closed else None)
            try:
                async for msg in ws:
                    if msg.type != WSMsgType.BINARY:
                        raise BrowserLinkError("an unsealed frame after the handshake")
                    session.feed(msg.data)
            except BrowserLinkError as exc:
                log.warning("browser node from %s: %s", peer, exc)
                session.close(str(exc))
            finally:
                session.close("the tab closed its link")
                pump.cancel()
                await ws.close()
        return ws

    @staticmethod
    async def _authenticate(
        ws: web.WebSocketResponse, secret: bytes, browser_nonce: bytes
    ) -> tuple[dict[str, Any], Sealer, Sealer]:
        """The sealed auth frame, proof the tab holds ``secret``; its header and the keys."""
        host_nonce = os.urandom(16)
        await ws.send_str(json.dumps({"nonce": b64(host_nonce)}))
        inbound, outbound = keys(secret, browser_nonce, host_nonce)
        first = await ws.receive()
        if first.type != WSMsgType.BINARY:
            raise BrowserLinkError("expected the sealed auth frame")
        header, _ = inbound.open(first.data)
        if header["op"] != "auth":
            raise BrowserLinkError(f"expected auth, got {header['op']}")
        return header, inbound, outbound

    async def _handshake(self, ws: web.WebSocketResponse) -> BrowserSession:
        if self.host is None:
            raise BrowserLinkError("this room takes no browser nodes (its host serves no model)")
        async with asyncio.timeout(HANDSHAKE_S):
            hello = await ws.receive()
            if hello.type != WSMsgType.TEXT:
                raise BrowserLinkError("the first message must be the JSON hello")
            ident, browser_nonce = parse_hello(hello.data)
            secret = self.host.secrets.claim(ident)
            if secret is None:
                raise BrowserLinkError(
                    "wrong secret: this join link is not valid for this room (used already, in use by another "
                    "tab, expired, or from another room); make a new one on the host's dashboard"
                )
            try:
                header, inbound, outbound = await self._authenticate(ws, secret, browser_nonce)
            except BaseException:
                self.host.secrets.release(ident)
                raise
        secrets = self.host.secrets
        credential = secrets.redeem(ident)
        try:
            await ws.send_bytes(outbound.seal({"op": "welcome", "credential": b64(credential)}))
        except BaseException:  # the tab never got the new one: the old one is good again
            secrets.withdraw(credential)
            secrets.release(ident)
            raise
        secrets.spent(ident)

        async def send(frame: bytes) -> None:
            await ws.send_bytes(frame)

        return BrowserSession(send, inbound, outbound, tab_facts(header))

