"""A room of three: a torch CPU host, a ``--device webgpu`` node (wgpu on Mesa's software Vulkan)
and a real headless Chromium tab lending its WebGPU (SwiftShader) through the host's dashboard.
The room's greedy tokens equal the local engine's; a tab with a wrong secret is refused."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from peerpipe import create_room, join_room
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.plan import Budget, stage_memory
from tests.webgpu.adapters import needs_wgpu

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader",
]
CONTEXT, SESSIONS = 64, 2
pytestmark = [
    needs_wgpu,
    pytest.mark.skipif(not Path(CHROMIUM).exists() and os.environ.get("CI") != "true", reason="no Debian chromium"),
    pytest.mark.slow,
]


def _memory_gb(model: str, layers: int) -> float:
    """What a node offers so that it holds at most ``layers`` layers (with embedding or head)."""
    from peerpipe.models import resolve_model

    spec = ModelChoice.from_dir(resolve_model(model), dtype="float32").spec
    return stage_memory(spec, Budget(CONTEXT, SESSIONS), 0, layers) / 0.9 / 1e9 + 1e-9


def _local_tokens(prompt: str, count: int) -> list[int]:
    from peerpipe.engine.generate import LocalEngine
    from peerpipe.engine.sampling import SamplingParams
    from peerpipe.models import resolve_model

    engine, _ = LocalEngine.from_dir(resolve_model("austen"), device="cpu", dtype="float32", max_seq=CONTEXT)
    ids = engine.tokenizer.encode(prompt)
    return engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=count)).tokens


def test_a_browser_tab_and_a_webgpu_node_serve_stages_with_the_local_engines_tokens(warm_bench: None) -> None:
    from playwright.async_api import async_playwright

    prompt, count = "It is a truth universally acknowledged", 12
    expected = _local_tokens(prompt, count)
    two_layers = _memory_gb("austen", 2)

    async def main() -> None:
        async with create_room(
            "austen", dtype="float32", device="cpu", memory_gb=two_layers, context=CONTEXT, sessions=SESSIONS,
            expect_nodes=3, quick=True, speculate="off",
        ) as room:
            api = await room.serve_http(("127.0.0.1", 0))
            async with join_room(str(room.code), peer=room.address, device="webgpu", memory_gb=two_layers,
                                 quick=True, name="wgpu"), async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    dash = await browser.new_page()
                    await dash.goto(api.url + "/")
                    await dash.click("#lend")
                    await dash.locator("#lend-link").wait_for(state="visible", timeout=10_000)
                    url = await dash.locator("#lend-url").get_attribute("href")
                    assert url and url.startswith(api.url + "/node#k=")
                    assert await dash.locator("#lend-qr svg").count() == 1

                    # A wrong secret is refused with a clear message, before any compute.
                    wrong = await browser.new_page()
                    await wrong.goto(api.url + "/node#k=" + "A" * 43)
                    await wrong.wait_for_function("document.body.dataset.state === 'refused'", timeout=30_000)
                    assert "wrong secret" in await wrong.locator("#error").inner_text()
                    await wrong.goto(api.url + "/node#k=!!!**")  # a mangled link: said so, not a JS error
                    await wrong.reload()
                    await wrong.wait_for_function("document.body.dataset.state === 'refused'", timeout=30_000)
                    assert "not a valid join link" in await wrong.locator("#error").inner_text()

                    tab = await browser.new_page()
                    await tab.goto(url)
                    await tab.wait_for_function("['joined', 'serving'].includes(document.body.dataset.state)",
                                                timeout=60_000)
                    assert "#k=" not in tab.url  # the one-time secret is off the address bar
                    plan = await room.plan(timeout_s=240)
                    devices = {m.info.node_id: m.info.device for m in room.view().members}
                    names = {m.info.node_id: m.info.name for m in room.view().members}
                    assert len(plan.stages) == 3, plan
                    assert sorted(names[s.node_id] for s in plan.stages)[0].startswith("browser"), names
                    assert {devices[s.node_id] for s in plan.stages} == {"cpu", "webgpu"}
                    result = await room.generate(prompt, temperature=0.0, max_tokens=count, timeout_s=120)
                    assert result.tokens == expected
                    assert int(await tab.locator("#forwards").inner_text()) >= count

                    # The one-time link cannot be used twice (a new tab has no credential).
                    again = await browser.new_page()
                    await again.goto(url)
                    await again.wait_for_function("document.body.dataset.state === 'refused'", timeout=30_000)

                    # A reload rejoins with the tab's credential, and the room plans it in again.
                    await tab.reload()
                    await tab.wait_for_function("document.body.dataset.state === 'joined'", timeout=60_000)

                    def replanned(_: object) -> bool:
                        view = room.view()
                        names = {m.info.node_id: m.info.name for m in view.members}
                        stages = view.plan.stages if view.plan else ()
                        return any(names.get(s.node_id) == "browser-2" for s in stages) and set(view.acked) >= {
                            s.node_id for s in stages
                        }

                    await room.cluster.wait_until(replanned, 240)
                    again_result = await room.generate(prompt, temperature=0.0, max_tokens=count, timeout_s=240)
                    assert again_result.tokens == expected
                finally:
                    await browser.close()
            await api.close()

    asyncio.run(asyncio.wait_for(main(), 400))
