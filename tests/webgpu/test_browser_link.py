"""The browser link (webgpu/browser_link.py) and the executor it carries (webgpu/remote.py):
sealed frames in order, refusals for anything else (fuzzed), one-time links, and a stage run on
the far side of a link by a tab written in Python over this machine's adapter."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peerpipe.webgpu import browser_link as bl
from peerpipe.webgpu.browser_link import (
    BrowserLinkError,
    BrowserSecrets,
    Sealer,
    keys,
    parse_hello,
    secret_id,
    unpack,
)
from peerpipe.webgpu.executor import WebGPUError
from peerpipe.webgpu.remote import BrowserSession, RemoteExecutor


def _pairs(secret: bytes) -> tuple[tuple[Sealer, Sealer], tuple[Sealer, Sealer]]:
    nb, nh = os.urandom(16), os.urandom(16)
    host = keys(secret, nb, nh)  # (from the browser, to the browser)
    tab = keys(secret, nb, nh)[::-1]  # the tab's (inbound, outbound) = (to it, from it)
    return host, tab


def test_frames_open_once_in_order_and_only_with_the_secret() -> None:
    secret = os.urandom(32)
    (h_in, h_out), (t_in, t_out) = _pairs(secret)
    frames = [t_out.seal({"op": "done", "seq": i}, bytes([i]) * i) for i in range(3)]
    assert [h_in.open(f) for f in frames] == [({"op": "done", "seq": i}, bytes([i]) * i) for i in range(3)]
    with pytest.raises(BrowserLinkError, match="failed authentication"):
        h_in.open(frames[0])  # a replayed frame
    assert t_in.open(h_out.seal({"op": "welcome"}, b"x")) == ({"op": "welcome"}, b"x")
    (w_in, _), _ = _pairs(os.urandom(32))
    with pytest.raises(BrowserLinkError, match="wrong secret"):
        w_in.open(t_out.seal({"op": "auth"}))
    tampered = bytearray(t_out.seal({"op": "x"}))
    tampered[3] ^= 1
    with pytest.raises(BrowserLinkError):
        h_in.open(bytes(tampered))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_a_malformed_frame_is_a_typed_error(raw: bytes) -> None:
    try:
        header, _ = unpack(raw)
    except BrowserLinkError:
        return
    assert isinstance(header["op"], str)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=120), st.builds(json.dumps, st.dictionaries(st.sampled_from(["v", "id", "nonce"]),
                                                                             st.one_of(st.text(max_size=30), st.integers())))))
def test_a_malformed_hello_is_a_typed_error(text: str) -> None:
    try:
        ident, nonce = parse_hello(text)
    except BrowserLinkError:
        return
    assert isinstance(ident, str) and len(nonce) == 16


def test_a_good_hello_and_the_refusals_say_why() -> None:
    nonce = bl.b64(os.urandom(16))
    assert parse_hello(json.dumps({"v": bl.PROTOCOL, "id": "ab", "nonce": nonce}))[0] == "ab"
    with pytest.raises(BrowserLinkError, match="reload the page"):
        parse_hello(json.dumps({"v": "peerpipe-browser-0", "id": "ab", "nonce": nonce}))
    with pytest.raises(BrowserLinkError, match="16 bytes"):
        parse_hello(json.dumps({"v": bl.PROTOCOL, "id": "ab", "nonce": bl.b64(b"short")}))


def test_a_join_link_is_used_once_and_leaves_a_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = BrowserSecrets()
    link = secrets.new_link()
    assert secrets.claim(secret_id(link)) == link
    assert secrets.claim(secret_id(link)) is None  # a second tab opening the link meanwhile
    credential = secrets.redeem(secret_id(link))
    secrets.spent(secret_id(link))
    assert secrets.claim(secret_id(link)) is None
    assert secrets.claim(secret_id(credential)) == credential  # a reload rejoins with it...
    newer = secrets.redeem(secret_id(credential))  # ...and gets the next one
    secrets.spent(secret_id(credential))
    assert secrets.claim(secret_id(credential)) is None and set(secrets.credentials) == {secret_id(newer)}
    late = secrets.new_link()
    now = bl.time.monotonic()
    monkeypatch.setattr(bl.time, "monotonic", lambda: now + bl.LINK_TTL_S + 1)
    assert secrets.claim(secret_id(late)) is None
    assert secrets.claim(secret_id(newer)) == newer  # a credential does not expire


def test_a_handshake_that_fails_gives_its_link_back() -> None:
    secrets = BrowserSecrets()
    link = secrets.new_link()
    assert secrets.claim(secret_id(link)) == link
    secrets.release(secret_id(link))
    assert secrets.claim(secret_id(link)) == link
    # The welcome carrying a new credential could not be sent (the tab reloaded meanwhile).
    lost = secrets.redeem(secret_id(link))
    secrets.withdraw(lost)
    secrets.release(secret_id(link))
    assert secrets.claim(secret_id(lost)) is None and secrets.claim(secret_id(link)) == link


class PythonTab:
    """The tab's side of the protocol (static/node.js) over this machine's adapter, for tests."""

    def __init__(self, inbound: Sealer, outbound: Sealer, to_host: asyncio.Queue[bytes]) -> None:
        from peerpipe.webgpu.load import local_executor

        self.gpu = local_executor()
        self.inbound, self.outbound, self.to_host = inbound, outbound, to_host
        self.ids: dict[int, int] = {}
        self.programs: dict[int, Any] = {}
        self.fail_next = False

    def handle(self, frame: bytes) -> None:
        from peerpipe.webgpu.executor import Dispatch

        header, payload = self.inbound.open(frame)
        op = header["op"]
        if op == "buffer":
            self.ids[header["id"]] = self.gpu.buffer(header["size"])
        elif op == "write":
            self.gpu.write(self.ids[header["id"]], payload, header["offset"])
        elif op == "free":
            self.gpu.free([self.ids.pop(i) for i in header["ids"]])
        elif op == "wt":
            self.gpu.weight_type = header["wt"]
        elif op == "run":
            if self.fail_next:
                self.to_host.put_nowait(self.outbound.seal({"op": "error", "seq": header["seq"], "message": "device lost"}))
                return
            work = header.get("d") or self.programs[header["p"]]
            self.programs[header["p"]] = work
            out = self.gpu.run(
                [Dispatch(k, tuple(self.ids[i] for i in ids), (x, y, z)) for k, ids, x, y, z in work],
                [(self.ids[i], size) for i, size in header["r"]],
            )
            self.to_host.put_nowait(self.outbound.seal({"op": "done", "seq": header["seq"]}, b"".join(out)))


def test_a_stage_runs_on_the_far_side_of_a_link(tmp_path: Path) -> None:
    from tests.webgpu.adapters import wgpu_adapter

    if not wgpu_adapter() and os.environ.get("CI") != "true":
        pytest.skip("no WebGPU adapter")
    from peerpipe.devtools.tiny_model import write_tiny_model
    from peerpipe.engine.loader import load_stage
    from peerpipe.webgpu.stage import WebGPUStage

    ref, _ = load_stage(write_tiny_model(tmp_path / "m", "qwen3"), device="cpu", dtype="float32")
    ids = torch.randint(0, 500, (1, 7), generator=torch.Generator().manual_seed(4))

    async def main() -> None:
        secret = os.urandom(32)
        (h_in, h_out), (t_in, t_out) = _pairs(secret)
        to_tab: asyncio.Queue[bytes] = asyncio.Queue()
        to_host: asyncio.Queue[bytes] = asyncio.Queue()

        async def send(frame: bytes) -> None:
            to_tab.put_nowait(frame)

        session = BrowserSession(send, h_in, h_out, {"adapter": "test tab", "f16": False, "max_binding": 1 << 26})
        tab = PythonTab(t_in, t_out, to_host)

        async def run_tab() -> None:
            while True:
                tab.handle(await to_tab.get())

        async def run_host() -> None:
            while True:
                session.feed(await to_host.get())

        tasks = [asyncio.create_task(c) for c in (session.pump(), run_tab(), run_host())]
        remote = RemoteExecutor(session)
        assert remote.name == "test tab (browser)" and not remote.has_f16

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            stage = WebGPUStage.from_torch(remote, ref, "f32")
            assert stage.remote
            cache = stage.new_cache(1, 16)
            cache.alloc()
            first = stage(ids, cache, cache.batch([0], 7), last_only=True)
            second = stage(ids[:, :1], cache, cache.batch([0], 1), last_only=True)  # the program by number
            return first, second

        first, second = await asyncio.to_thread(compute)
        tc = ref.new_cache(1, 16)
        tc.alloc()
        with torch.inference_mode():
            want = ref(ids, tc, tc.batch([0], 7), last_only=True)
            want2 = ref(ids[:, :1], tc, tc.batch([0], 1), last_only=True)
        assert float((first - want).abs().max()) < 1e-4 and float((second - want2).abs().max()) < 1e-4

        tab.fail_next = True
        with pytest.raises(WebGPUError, match="device lost"):
            await asyncio.to_thread(remote.run, [], [])
        tab.fail_next = False
        session.close("the tab closed its link")
        with pytest.raises(WebGPUError, match="left: the tab closed its link"):
            await asyncio.to_thread(remote.buffer, 64)
        with pytest.raises(RuntimeError, match="worker thread"):
            session.request({"op": "run"})
        for t in tasks:
            t.cancel()

    asyncio.run(asyncio.wait_for(main(), 60))
