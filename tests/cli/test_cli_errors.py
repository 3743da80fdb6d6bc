"""Every subcommand with what a user can type wrong: missing files, taken ports, bad values.
Each must end in one line on stderr and exit 1 (what went wrong) or 2 (a bad argument), never a
traceback, and a host must say nothing about a room it is not going to open."""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerpipe.cli.main import main
from peerpipe.models import default_model_dir


@pytest.fixture(scope="module")
def truncated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model with its last shard cut short, as an interrupted download leaves it."""
    folder = tmp_path_factory.mktemp("truncated") / "austen-cut"
    shutil.copytree(default_model_dir(), folder)
    shard = folder / "model-00002-of-00002.safetensors"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 100_000)
    return folder


@pytest.fixture(scope="module")
def notes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file that is no model at all."""
    path = tmp_path_factory.mktemp("notes") / "notes.txt"
    path.write_text("shopping list")
    return path


@pytest.fixture(scope="module")
def taken() -> Iterator[int]:
    """A loopback port something is listening on."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


@pytest.fixture(scope="module")
def web() -> Iterator[int]:
    """A loopback port where a web server answers whatever it is sent."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


@pytest.fixture(scope="module")
def closed() -> int:
    """A loopback port nothing listens on."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


LOOP = ["--listen", "127.0.0.1", "--no-mdns", "--quick"]

# (argv, exit code, words the one line must hold); {truncated}, {taken} and {closed} are filled in.
CASES: list[tuple[list[str], int, str]] = [
    (["host", "--model", "/no/such/model", *LOOP], 1, "no model folder"),
    (["host", "--model", "{truncated}", *LOOP], 1, "file truncated"),
    (["host", "--listen", "127.0.0.1:{taken}", "--no-mdns", "--quick"], 1, "Address already in use"),
    (["host", "--http", "127.0.0.1:{taken}", *LOOP], 1, "cannot serve HTTP"),
    (["host", "--device", "nonsense", *LOOP], 1, "unknown device"),
    (["host", "--code", "7-amber", *LOOP], 1, "room code"),
    (["host", "--context", "0", *LOOP], 2, "positive"),
    (["host", "--threads", "0", *LOOP], 2, "positive"),
    (["host", "--memory", "-1", *LOOP], 2, "must be a positive number"),
    (["host", "--heartbeat", "x", *LOOP], 2, "not a number"),
    (["host", "--replicas", "many", *LOOP], 2, "replicas"),
    (["host", "--listen", "nohost:99999"], 2, "HOST:PORT"),
    (["host", "--model", "austen", "--speculate", "draft", *LOOP], 1, "needs --draft DIR"),
    (["host", "--draft", "austen-draft", *LOOP], 1, "give the model too"),
    (["host", "--model", "austen", "--speculate-max", "99", *LOOP], 2, "from 1 to 64"),
    (["host", "--model", "austen", "--draft", "{truncated}", *LOOP], 1, "file truncated"),
    (["join"], 2, "code"),
    (["join", "7-amber"], 1, "room code"),
    (["join", "7-amber-falcon", "--peer", "nonsense"], 2, "HOST:PORT"),
    (["join", "7-amber-falcon", "--peer", "127.0.0.1:{closed}", "--quick"], 1, "could not connect"),
    (["join", "7-amber-falcon", "--model", "/no/such/model"], 1, "no model folder"),
    (["join", "7-amber-falcon", "--model", "{truncated}", "--peer", "127.0.0.1:{closed}"], 1, "file truncated"),
    (["join", "7-amber-falcon", "--device", "cuda:7", "--peer", "127.0.0.1:{closed}"], 1, "device"),
    (["generate", "hello"], 1, "--model DIR"),
    (["generate", "hello", "--model", "/no/such/model"], 1, "no model folder"),
    (["generate", "hello", "--model", "{truncated}"], 1, "file truncated"),
    (["generate", "hello", "--model", "ollama:no-such-model"], 1, "ollama pull no-such-model"),
    (["generate", "hello", "--model", "{notes}"], 1, "not a GGUF"),
    (["generate", "hello", "--model", "austen", "--max-tokens", "0"], 2, "positive"),
    (["generate", "hello", "--model", "austen", "--max-tokens", "lots"], 2, "whole number"),
    (["generate", "hello", "--model", "austen", "--temperature", "-1"], 2, "--temperature"),
    (["generate", "hello", "--model", "austen", "--top-p", "7"], 2, "--top-p"),
    (["generate", "hello", "--model", "austen", "--system", "be brief"], 2, "--chat"),
    (["generate", "hello", "--room", "7-amber-falcon", "--device", "cuda"], 2, "--device run a model here"),
    (["generate", "hello", "--room", "7-amber-falcon", "--speculate-max", "1"], 2, "--speculate-max run a model here"),
    (["join", "7-amber-falcon", "--timeout", "-5"], 2, "positive"),
    (["join", "7-amber-falcon", "--listen", "127.0.0.1:7000"], 2, "a member picks its own port"),
    (["join", "7-amber-falcon", "--peer", "127.0.0.1:{closed}", "--quantize", "keep"], 2, "give --model FILE.gguf"),
    (["generate", "hello", "--model", "austen", "--device", "nonsense"], 1, "unknown device"),
    (["generate", "hello", "--model", "austen", "--dtype", "int3"], 2, "invalid choice"),
    (["generate", "hello", "--room", "7-amber-falcon", "--peer", "oops"], 2, "HOST:PORT"),
    (["generate", "hello", "--room", "7-amber-falcon", "--timeout", "0"], 2, "positive"),
    (["generate", "hello", "--room", "7-amber-falcon", "--peer", "127.0.0.1:{closed}"], 1, "could not connect"),
    (["status", "--code", "7-amber-falcon", "--peer", "127.0.0.1:{closed}"], 1, "could not connect"),
    (["status", "--code", "nonsense"], 1, "room code"),
    (["status", "--code", "7-amber-falcon", "--peer", "127.0.0.1:{web}"], 1, "not a peerpipe node: it began with 'HTTP/1.1"),
    (["status", "--bogus"], 2, "unrecognized"),
    (["plan"], 2, "--model"),
    (["plan", "--model", "/no/such/model", "--node", "a:mem=8,tflops=1"], 1, "no model folder"),
    (["plan", "--model", "austen", "--node", "a:mem=lots,tflops=1"], 2, "must be a number"),
    (["plan", "--model", "austen", "--node", "a:mem=0.001,tflops=1"], 1, "missing"),
    (["plan", "--model", "austen", "--node", "a:mem=8,tflops=1", "--context", "0"], 2, "positive"),
    (["bench", "--device", "nonsense", "--quick"], 1, "unknown device"),
    (["bench", "--device", "cuda", "--quick"], 1, "no CUDA GPU"),
    (["bench", "--model", "/no/such/model"], 1, "no model folder"),
    (["demo", "--nodes", "0"], 2, "positive"),
    (["demo", "--model", "/no/such/model"], 1, "no model folder"),
    (["demo", "--model", "{truncated}", "--no-serve"], 1, "file truncated"),
    (["demo", "--max-pending", "-1"], 2, "0 or more"),
    (["doctor", "--model", "/no/such/model"], 1, "no model folder"),
    (["doctor", "--listen", "127.0.0.1:notaport"], 2, "HOST:PORT"),
    (["frobnicate"], 2, "invalid choice"),
]


@pytest.mark.parametrize(("argv", "code", "words"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line_and_a_clear_exit(
    argv: list[str],
    code: int,
    words: str,
    truncated: Path,
    notes: Path,
    taken: int,
    closed: int,
    web: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a.format(truncated=truncated, notes=notes, taken=taken, closed=closed, web=web) for a in argv]
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse's way out for bad arguments
        got = exit_.code
    out, err = capsys.readouterr()
    assert got == code, (got, out, err)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    if code == 1:  # (not a bad value: no usage above it)
        assert err.strip() == last, err
    assert last.startswith(("peerpipe: error:", "peerpipe ")), err
    assert words in last, last
    if argv[0] == "host":
        assert "room code" not in out, "a host that fails must not hand out a code"
