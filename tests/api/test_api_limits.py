"""Admission, API keys and clients that leave, on a room whose member answers slowly (its writes
are delayed 20 ms), so that an answer is still running when the next request arrives."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.api.apiroom import ApiRoom, http, open_api_room, wait_feed

KEY = "sekrit-key"
PAGE = "http://localhost:5173"  # a web app's origin the host lets call the API (--cors)
LONG = {"max_tokens": 50, "stream": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def room(model: Path, warm_bench: None, warm_layers) -> Iterator[ApiRoom]:  # type: ignore[no-untyped-def]
    warm_layers(model)
    room = open_api_room(
        model, 1, code="5-amber-falcon", host_args=("--sessions", "1", "--max-pending", "0", "--api-key", KEY, "--cors", PAGE),
        member_prefix=("env", "PEERPIPE_LINK_DELAY_MS=20"),
    )
    yield room
    room.stop()


def open_stream(room: ApiRoom, model: Path, key: str = KEY, origin: str = ""):  # type: ignore[no-untyped-def]
    body = json.dumps({"model": model.name, "prompt": "A long story", **LONG}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"} | ({"Origin": origin} if origin else {})
    request = urllib.request.Request(room.url + "/v1/completions", data=body, method="POST", headers=headers)
    return urllib.request.urlopen(request, timeout=30)


def test_api_key_is_required_but_the_page_is_open(room: ApiRoom, model: Path) -> None:
    wrong = openai.OpenAI(base_url=room.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.code == "invalid_api_key"
    right = openai.OpenAI(base_url=room.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in right.models.list().data] == [model.name]
    assert http("GET", room.url + "/metrics")[0] == 401
    assert http("GET", room.url + "/metrics", headers={"Authorization": "Bearer \xff\xfe"})[0] == 401
    assert http("GET", room.url + "/metrics", headers={"Authorization": f"bearer {KEY}"})[0] == 200
    assert http("GET", room.url + "/api/room")[0] == 401
    assert http("GET", room.url + f"/api/room?key={KEY}")[0] == 200
    status, _, page = http("GET", room.url + "/")
    assert status == 200 and b"<title>peerpipe</title>" in page


def test_busy_then_a_leaving_client_frees_the_session(room: ApiRoom, model: Path) -> None:
    client = openai.OpenAI(base_url=room.url + "/v1", api_key=KEY, max_retries=0)
    with open_stream(room, model) as first:
        assert first.readline().startswith(b"data: ")  # the one session is taken
        with pytest.raises(openai.InternalServerError) as busy:
            client.completions.create(model=model.name, prompt="me too", max_tokens=2)
        assert busy.value.status_code == 503 and busy.value.code == "server_busy"
        assert busy.value.response.headers["Retry-After"] == "1"
    # Closing the stream cancels that answer long before its 50 slow tokens are done.
    snapshot = wait_feed(room.url, lambda s: s["totals"]["cancelled"] >= 1 and not s["tasks"], key=KEY)
    assert snapshot["totals"]["tokens"] < 50
    reply = client.completions.create(model=model.name, prompt="now", max_tokens=2, extra_body={"ignore_eos": True})
    assert reply.usage is not None and reply.usage.completion_tokens == 2


def test_a_taken_http_port_is_a_clear_error(warm_bench: None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "peerpipe", "host", "--listen", "127.0.0.1:0", "--no-mdns", "--quick",
             "--device", "cpu", "--http", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120, check=False,
        )
    assert out.returncode == 1
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_pages_of_the_origins_cors_names_may_call_the_api_and_no_others(room: ApiRoom, model: Path) -> None:
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = http("OPTIONS", room.url + "/v1/completions", headers={"Origin": PAGE, **ask})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == PAGE  # asked without the key
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    status, _, body = http("OPTIONS", room.url + "/v1/completions", headers={"Origin": "http://evil.example", **ask})
    error = json.loads(body)["error"]
    assert status == 403 and error["code"] == "cross_origin" and "--cors http://evil.example" in error["message"]
    # The page reads answers, streamed ones too, and errors; another origin's page gets no such header.
    with open_stream(room, model, origin=PAGE) as stream:
        assert stream.headers["Access-Control-Allow-Origin"] == PAGE and stream.readline().startswith(b"data: ")
    wait_feed(room.url, lambda s: not s["tasks"], key=KEY)  # (its session is free again)
    status, headers, _ = http("GET", room.url + "/v1/models", headers={"Origin": PAGE})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == PAGE
    status, headers, _ = http("GET", room.url + "/v1/models", headers={"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_a_stopping_host_ends_a_running_stream_with_an_error_event(room: ApiRoom, model: Path) -> None:
    """Ctrl-C on the host cuts an answer off: its stream says so in an error event (a client
    would otherwise take the cut text for a whole answer). Last in this file: it stops the room."""
    with open_stream(room, model) as stream:
        assert stream.readline().startswith(b"data: ")
        room.host.proc.send_signal(signal.SIGINT)
        events = [line[6:].strip() for line in stream.read().splitlines() if line.startswith(b"data: ")]
    error = json.loads(events[-1])["error"]
    assert error["code"] == "server_stopping" and b"[DONE]" not in events
    assert room.host.proc.wait(timeout=30) == 0
