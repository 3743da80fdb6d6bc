"""``peerpipe generate`` as a user runs it: a real subprocess, real files, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peerpipe.engine.generate import LocalEngine, encode_prompt
from peerpipe.engine.sampling import SamplingParams


def peerpipe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerpipe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_json_output_has_the_promised_fields(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3", seed=4)
    out = peerpipe(
        "generate", "--model", str(path), "--max-tokens", "16", "--temperature", "0", "--json", "Hello world"
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"text", "tokens", "prompt_ids", "tok_s"} <= set(result)
    engine, _ = LocalEngine.from_dir(path, device="cpu", max_seq=64)
    ids = encode_prompt(engine.tokenizer, "Hello world")
    expected = engine.generate(ids, SamplingParams(temperature=0, max_tokens=16))
    assert result["prompt_ids"] == ids
    assert result["tokens"] == expected.tokens
    assert result["text"] == expected.text
    assert result["tok_s"] > 0


def test_the_bundled_draft_drafts_for_the_bundled_model_with_the_same_tokens() -> None:
    from peerpipe.models import default_model_dir

    prompt = "It was a fine morning in April, and Emma"
    out = peerpipe("generate", "--model", "austen", "--json", "--max-tokens", "48", "--ignore-eos", "--temperature", "0",
                   "--draft", "austen-draft", prompt)
    assert out.returncode == 0, out.stderr
    drafted = json.loads(out.stdout)
    engine, _ = LocalEngine.from_dir(default_model_dir(), device="cpu", max_seq=128)
    plain = engine.generate(encode_prompt(engine.tokenizer, prompt), SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    assert drafted["tokens"] == plain.tokens
    spec = drafted["speculation"]
    assert spec["mode"] == "draft" and spec["accepted"] > 0 and spec["steps"] + spec["accepted"] == 47


def test_streams_text_and_reports_speed(tiny_model_dir) -> None:
    path = tiny_model_dir("llama", seed=4)
    out = peerpipe(
        "generate", "--model", str(path), "--max-tokens", "10", "--seed", "3", "--temperature", "0.8", "Once"
    )
    assert out.returncode == 0, out.stderr
    again = peerpipe(
        "generate",
        "--model",
        str(path),
        "--max-tokens",
        "10",
        "--seed",
        "3",
        "--temperature",
        "0.8",
        "--json",
        "Once",
    )
    assert out.stdout.rstrip("\n") == json.loads(again.stdout.splitlines()[-1])["text"]
    assert "tok/s" in out.stderr


def test_chat_flag_uses_the_template(tiny_model_dir) -> None:
    path = tiny_model_dir("llama", seed=4)
    out = peerpipe("generate", "--model", str(path), "--max-tokens", "4", "--chat", "--json", "hi")
    ids = json.loads(out.stdout.splitlines()[-1])["prompt_ids"]
    assert ids[:2] == [0, 2]  # BOS, then <|im_start|> from the ChatML template


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["generate", "--model", "/definitely/not/here", "x"], 1, "no model folder"),
        (["generate", "--model", ".", "x"], 1, "config.json"),
        (["generate", "--model", ".", "--max-tokens", "0", "x"], 2, "positive integer"),
        (["generate", "--model", ".", "--dtype", "int4", "x"], 2, "invalid choice"),
        (["generate", "x"], 1, "--model DIR to run a model here, or --room CODE"),
        (["generate", "--model", "austen", "--speculate", "draft", "x"], 1, "needs --draft DIR"),
        (["generate", "--model", "austen", "--draft", "smollm-nope", "x"], 1, "no model folder"),
        (["generate", "--model", "austen", "--speculate-max", "0", "x"], 2, "from 1 to 64"),
        (["generate", "--room", "2-amber-falcon", "--draft", "austen-draft", "x"], 2, "host's --draft"),
    ],
)
def test_errors_are_one_line_without_traceback(args: list[str], code: int, needle: str) -> None:
    out = peerpipe(*args)
    assert out.returncode == code
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_unsupported_architecture_is_one_clear_line(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("llama")
    dst = tmp_path / "bert"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    out = peerpipe("generate", "--model", str(dst), "x")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "BertForMaskedLM" in lines[0] and "LlamaForCausalLM" in lines[0]


def test_bad_sampling_values_are_refused(tiny_model_dir) -> None:
    out = peerpipe("generate", "--model", str(tiny_model_dir("llama")), "--top-p", "3", "x")
    assert out.returncode == 2 and "--top-p" in out.stderr and "Traceback" not in out.stderr  # (a bad value, named by its flag)


def test_asking_beyond_the_context_is_one_line(tiny_model_dir) -> None:
    out = peerpipe("generate", "--model", str(tiny_model_dir("llama")), "--max-tokens", "100000000000", "x")
    assert out.returncode == 1 and "context of 256 positions" in out.stderr
    assert "Traceback" not in out.stderr
