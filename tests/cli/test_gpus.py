"""``--gpus``: one command runs a node per GPU, each planned on its own, and their hidden states
stay in the machine's shared memory. On this machine without GPUs the test hook
PEERPIPE_TEST_GPUS_AS_CPU makes every "GPU" the CPU, which runs the same mechanics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from peerpipe.cli.gpus import gpu_nodes
from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.sampling import SamplingParams
from peerpipe.errors import PeerpipeError
from tests.inference.test_pipeline_cli import CODE, CONTEXT, SESSIONS, ask, memory_gb
from tests.room.roomproc import REPO, RoomProc

AS_CPU = {"PEERPIPE_TEST_GPUS_AS_CPU": "1", "PEERPIPE_TEST_GPU_COUNT": "2"}


def test_gpus_are_parsed_and_checked(monkeypatch) -> None:
    monkeypatch.setenv("PEERPIPE_TEST_GPUS_AS_CPU", "1")
    monkeypatch.setenv("PEERPIPE_TEST_GPU_COUNT", "2")
    assert [(n.index, n.name) for n in gpu_nodes("all", "box", 3.0)] == [(0, "box-gpu0"), (1, "box-gpu1")]
    shared = gpu_nodes("0,0", "box", None)
    assert [n.name for n in shared] == ["box-gpu0-1", "box-gpu0-2"]
    assert shared[0].memory_gb == shared[1].memory_gb and shared[0].memory_gb > 0  # they split the GPU
    with pytest.raises(PeerpipeError, match="no GPU 2 here"):
        gpu_nodes("0,2", "box", None)
    monkeypatch.setenv("PEERPIPE_TEST_GPU_COUNT", "0")
    with pytest.raises(PeerpipeError, match="needs CUDA GPUs"):
        gpu_nodes("all", "box", None)


def test_gpus_and_device_are_refused_together() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "peerpipe", "join", "5-amber-falcon", "--gpus", "0,1", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, **AS_CPU},
    )
    assert out.returncode != 0 and "--gpus or --device, not both" in out.stderr


def test_one_command_runs_a_node_per_gpu_that_answer_as_one_node(procs, tiny_model_dir, warm_layers) -> None:
    model = tiny_model_dir("llama", config_overrides={"num_hidden_layers": 6})
    warm_layers(model)
    host = RoomProc(
        "host", "--listen", "127.0.0.1:0", "--no-mdns", "--code", CODE, "--name", "box", "--model", str(model),
        "--dtype", "float32", "--context", str(CONTEXT), "--sessions", str(SESSIONS), "--quick", "--threads", "1",
        "--gpus", "0,1", "--memory", memory_gb(model, 3), env=AS_CPU,
    )
    procs.append(host)
    address = "127.0.0.1:" + host.expect(r"^listening on 127\.0\.0\.1:(\d+)$").group(1)
    child = int(host.expect(r"^box-gpu1: started on cpu \(pid (\d+)\)$", timeout=60).group(1))
    host.expect(r"^\[box-gpu1\] joined room 2: host box-gpu0", timeout=60)
    plan = host.expect(r"^plan v\d+: (.*)$", timeout=60).group(1)
    assert "box-gpu0[0,3) -local-> box-gpu1[3,6)" in plan, plan
    host.expect(r"^ready: ", timeout=60)

    status = subprocess.run(
        [sys.executable, "-m", "peerpipe", "status", "--json", "--code", CODE, "--peer", address],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    stages = json.loads(status.stdout)["plan"]["stages"]
    assert [s["wire"] for s in stages] == ["local", "local"]  # (the last: its tokens may come ahead through it)

    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=CONTEXT)
    done = ask(address, "", temperature=0.0)
    assert list(done.tokens) == engine.generate(list(done.prompt_ids), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)).tokens

    host.interrupt()  # the host says goodbye and stops its GPUs' nodes with it
    assert host.wait(30) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_two_nodes_on_gpu_0_serve_the_8b_shape(procs, tmp_path) -> None:
    """On a GPU machine: ``--gpus 0,0`` puts two nodes on GPU 0, which split its memory and the
    Llama-3-8B shape (drawn on the GPU), and answer as one node does."""
    from peerpipe.devtools.tiny_model import tiny_config, write_random_model

    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                 max_position_embeddings=8192)
    model = write_random_model(tmp_path / "llama-3-8b", tiny_config("llama", **shape), dtype="bfloat16", on_device=True)
    host = RoomProc(
        "host", "--listen", "127.0.0.1:0", "--no-mdns", "--code", CODE, "--name", "box", "--model", str(model),
        "--context", str(CONTEXT), "--sessions", str(SESSIONS), "--quick", "--gpus", "0,0", "--memory", "10",
    )
    procs.append(host)
    address = "127.0.0.1:" + host.expect(r"^listening on 127\.0\.0\.1:(\d+)$").group(1)
    plan = host.expect(r"^plan v\d+: (.*)$", timeout=120).group(1)
    assert re.fullmatch(r"box-gpu0-(\d)\[0,\d+\) -local-> box-gpu0-(?!\1)\d\[\d+,32\).*", plan), plan
    host.expect(r"^ready: ", timeout=120)
    engine, _ = LocalEngine.from_dir(model, device="cuda", dtype="bfloat16", max_seq=CONTEXT)
    done = ask(address, "", temperature=0.0)
    want = engine.generate(list(done.prompt_ids), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)).tokens
    assert list(done.tokens) == want
    host.interrupt()
    assert host.wait(60) == 0
