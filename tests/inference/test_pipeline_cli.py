"""A room of three real processes on loopback serves a model; ``peerpipe generate --room`` gets
the same tokens as ``peerpipe generate --model`` on one node."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from peerpipe.cli.args import parse_address
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.engine.generate import LocalEngine, encode_prompt
from peerpipe.engine.sampling import SamplingParams
from peerpipe.inference.client import remote_generate
from peerpipe.plan import Budget, stage_memory
from peerpipe.protocol import GenerateDone, GenerateRequest, Sampling
from peerpipe.room import parse_code
from tests.room.roomproc import REPO, RoomProc

CODE = "2-amber-falcon"
CONTEXT, SESSIONS = 64, 4
ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


def peerpipe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerpipe", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def memory_gb(model: Path, layers: int) -> str:
    """What a node may offer so that it holds at most ``layers`` layers (plus embedding or head)."""
    spec = ModelChoice.from_dir(model, dtype="float32").spec
    need = stage_memory(spec, Budget(CONTEXT, SESSIONS), 0, layers)
    return f"{need / 0.9 / 1e9 + 1e-9:.9f}"


def open_room(
    procs: list[RoomProc], model: Path, members: int, layers_per_node: int | None, member_prefix: tuple[str, ...] = (),
    host_args: tuple[str, ...] = (),
    fetching: int = 0,
) -> tuple[RoomProc, str, list[RoomProc]]:
    """A host and ``members``; the first ``fetching`` join with no model and fetch their layers."""
    memory = ["--memory", memory_gb(model, layers_per_node)] if layers_per_node else []
    common = ["--quick", *memory]
    host = RoomProc(
        "host", "--listen", "127.0.0.1:0", "--no-mdns", "--code", CODE, "--name", "h", "--model", str(model),
        "--dtype", "float32", "--expect-nodes", str(members + 1), "--context", str(CONTEXT),
        "--sessions", str(SESSIONS), "--device", "cpu", *common, *host_args,
    )
    procs.append(host)
    address = "127.0.0.1:" + host.expect(r"^listening on 127\.0\.0\.1:(\d+)$").group(1)
    joined = []
    for i in range(members):
        member = RoomProc(
            "join", CODE, "--peer", address, "--listen", "127.0.0.1", "--name", f"m{i}",
            *(("--model", str(model)) if i >= fetching else ()), "--device", "cpu", *common, prefix=member_prefix,
        )
        procs.append(member)
        joined.append(member)
    host.expect(r"^ready: ", timeout=60)
    return host, address, joined


def local(model: Path, prompt: str, params: SamplingParams) -> dict:
    """What ``peerpipe generate --model`` gives, computed in this process (torch is loaded here)."""
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=CONTEXT)
    ids = encode_prompt(engine.tokenizer, prompt)
    result = engine.generate(ids, params)
    return {"tokens": result.tokens, "prompt_ids": result.prompt_ids, "text": result.text}


def generate(*args: str) -> dict:
    out = peerpipe("generate", "--json", "--max-tokens", "12", "--ignore-eos", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def ask(address: str, prompt: str, speculate: str = "", **sampling: object) -> GenerateDone:
    """What ``generate --room`` asks, from this process (no interpreter to start per answer)."""
    record = Sampling(max_tokens=12, ignore_eos=True, **sampling)  # type: ignore[arg-type]
    request = GenerateRequest(uuid.uuid4().hex, prompt, record, speculate=speculate)
    done = asyncio.run(remote_generate(parse_code(CODE), parse_address(address), request, timeout_s=60))
    assert not done.error, done.error
    return done


@pytest.mark.parametrize("arch", ARCHS)
def test_three_processes_answer_like_one(arch: str, procs, tiny_model_dir, warm_layers) -> None:
    model = tiny_model_dir(arch)
    warm_layers(model)
    # The model drafts for itself: nearly every draft is kept, so steps carry long drafted blocks.
    # Members' writes wait 5 ms, as on a LAN: drafting pays for sure, whatever else loads the machine.
    lan = ("env", "PEERPIPE_LINK_DELAY_MS=5")
    # m0 joins with nothing but the code: it fetches its layers from the room (docs/weights.md).
    _host, address, members = open_room(
        procs, model, members=2, layers_per_node=2, member_prefix=lan, host_args=("--draft", str(model)), fetching=1
    )
    members[0].expect(r"^fetching layers \[\d+, \d+\): 100%", timeout=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = local(model, "the quiet harbour", greedy)
    remote = generate("--room", CODE, "--peer", address, "--temperature", "0", "the quiet harbour")  # the CLI's way
    assert len(remote["stages"]) == 3, remote["stages"]
    assert remote["tokens"] == expected["tokens"] and remote["prompt_ids"] == expected["prompt_ids"]
    assert remote["text"] == expected["text"]
    spec = remote["speculation"]
    assert spec["mode"] == "draft" and spec["drafted"] > 0 and spec["acceptance"] > 0.8, spec
    assert spec["tokens_per_step"] > 1.5 and spec["steps"] + spec["accepted"] >= len(expected["tokens"]) - 1
    expected = local(model, "a b c", greedy)
    for mode in ("draft", "ngram"):  # without drafts, rooms are checked in test_pipeline.py
        other = ask(address, "a b c", mode, temperature=0.0)
        assert list(other.tokens) == expected["tokens"] and other.speculate == mode
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=77, max_tokens=12, ignore_eos=True)
    drafted = ask(address, "the quiet harbour", temperature=0.8, top_p=0.9, seed=77)
    assert list(drafted.tokens) == local(model, "the quiet harbour", seeded)["tokens"]
    # The draft drew with the verifier's noise: sampled drafts are kept as greedy ones are.
    assert drafted.drafted > 0 and drafted.accepted / drafted.drafted > 0.8, drafted
    status = json.loads(peerpipe("status", "--json", "--code", CODE, "--peer", address).stdout)
    assert len(status["plan"]["stages"]) == 3 and sorted(status["plan"]["acked"]) == sorted(
        n["node_id"] for n in status["nodes"]
    )


def test_a_stage_killed_mid_answer_is_replayed_and_the_client_sees_no_error(procs, tiny_model_dir, warm_layers) -> None:
    model = tiny_model_dir("llama")
    warm_layers(model)
    # Members' writes are delayed 30 ms, so the answer runs for seconds, not milliseconds; three
    # layers a node: the plan needs two nodes of three, and the third can take over.
    slow = ("env", "PEERPIPE_LINK_DELAY_MS=30")
    host, address, members = open_room(procs, model, members=2, layers_per_node=3, member_prefix=slow)
    ready = next(line for line in host.seen if line.startswith("ready: "))
    victim = next(i for i, m in enumerate(members) if f"m{i}[" in ready)
    expected = local(model, "x", SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    client = RoomProc("generate", "--room", CODE, "--peer", address, "--max-tokens", "40", "--ignore-eos",
                      "--temperature", "0", "--json", "x")
    procs.append(client)
    host.expect(r"^request \w+: started")
    tasks = json.loads(peerpipe("status", "--json", "--code", CODE, "--peer", address).stdout)["tasks"]
    assert [t["status"] for t in tasks] in (["prefill"], ["decoding"])
    members[victim].proc.kill()
    host.expect(rf"^recovering: stage m{victim} left the room", timeout=30)
    answer = json.loads(client.expect(r"^(\{.*\})$", timeout=60).group(1))
    assert answer["tokens"] == expected["tokens"] and answer["finish_reason"] == "length"
    assert client.wait(timeout=10) == 0, client.stderr()
    host.expect(r"^request \w+: 40 tokens", timeout=30)


def test_a_room_of_one_answers_locally(procs, tiny_model_dir, warm_layers) -> None:
    model = tiny_model_dir("llama")
    warm_layers(model)
    host, address, _ = open_room(procs, model, members=0, layers_per_node=None)
    assert "runs locally" in host.seen[-1] or any("locally" in line for line in host.seen)
    expected = local(model, "hi", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    remote = generate("--room", CODE, "--peer", address, "--temperature", "0", "hi")
    assert remote["tokens"] == expected["tokens"] and remote["stages"] == ["h[0,4)"]


def test_generate_needs_a_model_or_a_room() -> None:
    out = peerpipe("generate", "hello")
    assert out.returncode == 1 and "--room" in out.stderr


def test_asking_a_room_does_not_load_torch() -> None:
    """``generate --room`` is a client: it starts in a fraction of the time torch takes to import."""
    code = (
        "import sys\n"
        "from peerpipe.cli.main import main\n"
        "sys.argv = ['peerpipe', 'generate', '--room', '2-amber-falcon', '--peer', '127.0.0.1:1', 'hi']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
