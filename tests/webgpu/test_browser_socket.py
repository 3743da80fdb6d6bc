"""The host's browser-node socket (api/browser_nodes.py) over a real WebSocket on loopback: tabs
that open one join link at once, and a tab that reloads with its credential. The room member
behind the socket is a stand-in (this tests the handshake, not the member)."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
from aiohttp import web

from peerpipe.api.browser_nodes import BrowserRoutes
from peerpipe.webgpu.browser_link import PROTOCOL, BrowserSecrets, b64, keys, secret_id, unb64
from peerpipe.webgpu.remote import BrowserSession


class Host:
    def __init__(self) -> None:
        self.secrets = BrowserSecrets()

    async def serve(self, session: BrowserSession) -> None:
        await session.closed.wait()  # a member until the socket closes


async def _tab(http: aiohttp.ClientSession, url: str, secret: bytes) -> tuple[str, bytes | str]:
    """A tab's handshake: ("joined", its new credential) or ("refused", the host's reason)."""
    async with http.ws_connect(url) as ws:
        nonce = os.urandom(16)
        await ws.send_str(json.dumps({"v": PROTOCOL, "id": secret_id(secret), "nonce": b64(nonce)}))
        reply = json.loads((await ws.receive()).data)
        if "error" in reply:
            return "refused", reply["error"]
        to_host, from_host = keys(secret, nonce, unb64(reply["nonce"]))
        await ws.send_bytes(to_host.seal({"op": "auth", "adapter": "test", "f16": False, "memory": 1}))
        header, _ = from_host.open((await ws.receive()).data)
        assert header["op"] == "welcome"
        return "joined", unb64(header["credential"])


def test_tabs_opening_one_link_at_once_join_once_and_a_reload_ends_the_old_credential() -> None:
    async def main() -> None:
        host = Host()
        app = web.Application()
        app.add_routes(BrowserRoutes(host).routes())
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}/api/browser-node"
        try:
            async with aiohttp.ClientSession() as http:
                link = host.secrets.new_link()
                outcomes = await asyncio.gather(*(_tab(http, url, link) for _ in range(3)))
                joined = [value for kind, value in outcomes if kind == "joined"]
                refused = [value for kind, value in outcomes if kind == "refused"]
                assert len(joined) == 1 and len(refused) == 2, outcomes
                assert all("wrong secret" in str(why) for why in refused)
                credential = joined[0]
                assert isinstance(credential, bytes)
                kind, newer = await _tab(http, url, credential)  # the tab reloads
                assert kind == "joined" and newer != credential
                assert (await _tab(http, url, credential))[0] == "refused"  # the old one is over
                assert (await _tab(http, url, link))[0] == "refused"
        finally:
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(main(), 30))
