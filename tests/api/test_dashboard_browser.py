"""A real headless Chromium (Debian's package, driven by Playwright) opens the dashboard of a room of
three processes, sees its nodes and plan, chats with the model and sees the answer stream in."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.apiroom import ApiRoom, open_api_room

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What the probe of this machine found Chromium needs when run as root with no network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and os.environ.get("CI") != "true",
    reason="Debian's chromium is not installed (.ci/run installs it)",
)


@pytest.fixture(scope="module")
def room(tiny_model_dir, warm_bench: None, warm_layers) -> Iterator[ApiRoom]:  # type: ignore[no-untyped-def]
    model = tiny_model_dir("llama")
    warm_layers(model)
    room = open_api_room(model, 2, code="6-amber-falcon", context=128)
    yield room
    room.stop()


def test_dashboard_shows_the_room_and_streams_a_chat(room: ApiRoom, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(room.url + "/")
            expect(page.locator("#code")).to_have_text(room.code)
            expect(page.locator("#state")).to_have_text("ready")
            rows = page.locator("#nodes tbody tr")
            expect(rows).to_have_count(3)
            assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.node)")) == ["h", "m0", "m1"]
            expect(page.locator("#pipeline .stage")).to_have_count(3)
            expect(page.locator("#links tbody tr")).to_have_count(3)
            expect(page.locator("#key-form")).to_be_hidden()  # no API key on this room
            # A browser node's 0.003 TFLOPS reads as such, not as 0.00.
            assert page.evaluate("[fmt(0.003, 2), fmt(1.234, 2), fmt(0, 2), fmt(null)]") == ["0.0030", "1.23", "0.00", "–"]

            # Count how often the answer's text changes while it streams in.
            page.evaluate(
                """() => { window.updates = 0; new MutationObserver(() => window.updates++)
                  .observe(document.querySelector('#messages'), {subtree: true, characterData: true, childList: true}); }"""
            )
            page.fill("#chat-input", "Tell me a story")
            page.click("#chat-send")
            answer = page.locator(".msg.assistant[data-done='1']")
            expect(answer).to_have_count(1, timeout=60_000)
            text = answer.inner_text()
            assert text.strip(), "the answer is empty"
            assert page.locator(".msg.error").count() == 0
            assert page.evaluate("window.updates") > 3, "the answer arrived in one piece, not streamed"
            expect(page.locator("#totals")).to_contain_text("answers 1 ")
            # The first answer filled the room's 128-token context: the next turn goes on without it.
            page.fill("#chat-input", "And then?")
            page.click("#chat-send")
            expect(answer).to_have_count(2, timeout=60_000)
            assert page.locator(".msg.error").count() == 0 and answer.nth(1).inner_text().strip()
            expect(page.locator(".msg.note")).to_contain_text("1 earlier turn(s) left out")
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if out := os.environ.get("PEERPIPE_SCREENSHOTS"):
                shutil.copy(shot, Path(out) / "dashboard.png")
        finally:
            browser.close()
