"""The host's browser-node socket (api/browser_nodes.py) over a real WebSocket on loopback: tabs
that open one join link at once, and a tab that reloads with its credential. The room member
behind the socket is a stand-in (this tests the handshake, not the member)."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import pytest
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


@pytest.mark.parametrize(
    ("host", "bound", "lan", "url", "local_only"),
    [
        ("localhost:8088", ("0.0.0.0", 8088), "192.168.1.20", "192.168.1.20:8088", False),
        ("[::1]:8088", ("::", 8088), "192.168.1.20", "192.168.1.20:8088", False),
        ("127.0.0.1:8088", ("192.168.1.20", 8088), "10.0.0.9", "192.168.1.20:8088", False),
        ("localhost:8088", ("127.0.0.1", 8088), "192.168.1.20", "localhost:8088", True),
        ("localhost:8088", ("0.0.0.0", 8088), "127.0.0.1", "localhost:8088", True),  # no network at all
        ("studio.lan:8088", ("0.0.0.0", 8088), "192.168.1.20", "studio.lan:8088", False),
    ],
)
def test_a_join_link_names_an_address_other_devices_reach(
    host: str, bound: tuple[str, int], lan: str, url: str, local_only: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dashboard opened at localhost must not send a phone to the phone's own localhost."""
    from aiohttp.test_utils import make_mocked_request

    from peerpipe.api import browser_nodes

    monkeypatch.setattr(browser_nodes, "default_lan_ip", lambda: lan)  # this machine's route, as the OS says
    routes = BrowserRoutes(Host())
    routes.bound = bound
    request = make_mocked_request("POST", "/api/browser-link", headers={"Host": host})
    assert routes._link_host(request) == (url, local_only)


def test_what_a_tab_says_of_itself_is_kept_within_what_a_browser_can_say() -> None:
    from peerpipe.api.browser_nodes import MAX_TAB_MEMORY, tab_facts

    claimed = tab_facts({"adapter": "x" * 999, "f16": "yes", "max_binding": -5, "memory": 10**18, "extra": 1})
    assert claimed == {"adapter": "x" * 200, "f16": False, "max_binding": 0, "memory": MAX_TAB_MEMORY}
    honest = {"adapter": "Apple M2", "f16": True, "max_binding": 1 << 27, "memory": 4 << 30}
    assert tab_facts(honest) == honest
    assert tab_facts({"memory": True})["memory"] is None and tab_facts({})["adapter"] == "WebGPU adapter"
