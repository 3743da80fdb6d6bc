"""``--https``: a self-signed certificate made once per machine, naming the addresses served, that a
client trusting it verifies (browsers lend their GPU only to secure pages)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from aiohttp import ClientSession, TCPConnector, web

from peerpipe.api.tls import self_signed


def test_a_self_signed_certificate_is_made_once_and_verifies_for_its_addresses(tmp_path: Path) -> None:
    context = self_signed(["127.0.0.1"], tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and (tmp_path / files[1]).stat().st_mode & 0o077 == 0  # the key is private
    self_signed(["127.0.0.1"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # kept: a browser's exception stays good

    async def main() -> str:
        app = web.Application()
        app.router.add_get("/", lambda _: web.Response(text="secure"))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        trust = ssl.create_default_context(cafile=str(next(tmp_path.glob("*.crt"))))
        try:
            async with ClientSession(connector=TCPConnector(ssl=trust)) as client:
                async with client.get(f"https://127.0.0.1:{port}/") as response:
                    return await response.text()
        finally:
            await runner.cleanup()

    assert asyncio.run(main()) == "secure"
