"""What the OpenAI API costs: the same answers from the local engine, from a host's API (streamed and
not, one client and several), side by side in one run.

    python bench/api.py                          # the bundled model, CPU, float32
    python bench/api.py --shape llama-3.2-1b --device cuda --dtype bfloat16   # random weights

The host is a real ``peerpipe host`` process serving one node (every layer local), so the API
path adds HTTP, JSON, SSE and the host's task bookkeeping to the engine's work; the client is
the official ``openai`` package in this process. Each answer is greedy, ignores EOS and has the
same length. Prints a table of tokens per second and ratios to the local engine, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import openai  # noqa: E402
from engine import SHAPES  # noqa: E402

from peerpipe.devtools.tiny_model import tiny_config, write_random_model  # noqa: E402
from peerpipe.engine.generate import LocalEngine  # noqa: E402
from peerpipe.engine.sampling import SamplingParams  # noqa: E402
from peerpipe.models import default_model_dir  # noqa: E402

PROMPT = "It was a fine morning in April, and Emma"


def local_tok_s(model: Path, args: argparse.Namespace, *, cuda_graphs: bool | None = None) -> float:
    engine, _ = LocalEngine.from_dir(model, device=args.device, dtype=args.dtype, max_seq=1024, cuda_graphs=cuda_graphs)
    ids = engine.tokenizer.encode(PROMPT)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    engine.generate(ids, params)  # warm-up
    runs = [engine.generate(ids, params) for _ in range(args.repeats)]
    return max(len(r.tokens) / (r.prefill_s + r.decode_s) for r in runs)


def start_host(model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        sys.executable, "-m", "peerpipe", "host", "--listen", "127.0.0.1:0", "--no-mdns", "--model", str(model),
        "--device", args.device, "--dtype", args.dtype, "--http", "127.0.0.1:0", "--quick",
        "--sessions", str(max(args.streams, 1)), "--context", "1024",
    ]
    host = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = ""
    assert host.stdout is not None
    for line in host.stdout:
        if m := re.match(r"^dashboard: (http://\S+)/$", line.strip()):
            url = m.group(1)
        if line.startswith("ready: "):
            return host, url
    raise RuntimeError("the host exited before it was ready")


async def api_tok_s(url: str, model: str, args: argparse.Namespace, *, stream: bool, clients: int) -> float:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600) as client:

        async def one() -> int:
            kwargs = {"model": model, "prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0,
                      "extra_body": {"ignore_eos": True}}
            if not stream:
                reply = await client.completions.create(**kwargs)  # type: ignore[call-overload]
                return reply.usage.completion_tokens
            chunks = await client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)  # type: ignore[call-overload]
            used = 0
            async for chunk in chunks:
                if chunk.usage is not None:
                    used = chunk.usage.completion_tokens
            return used

        await one()  # warm-up
        best = 0.0
        for _ in range(args.repeats):
            began = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one() for _ in range(clients))))
            best = max(best, tokens / (time.perf_counter() - began))
        return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight model of this shape instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=8, help="concurrent clients in the last row (8)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.shape:
        args.model = ROOT / ".bench" / f"api-{args.shape}-{args.dtype}"
        if not (args.model / "config.json").is_file():
            write_random_model(args.model, tiny_config("llama", **SHAPES[args.shape]), seed=0, dtype=args.dtype)
    print(f"local engine: {args.tokens} tokens x {args.repeats} ...", file=sys.stderr, flush=True)
    local = local_tok_s(args.model, args)
    eager = local_tok_s(args.model, args, cuda_graphs=False) if args.device.startswith("cuda") else None
    print("starting a host ...", file=sys.stderr, flush=True)
    host, url = start_host(args.model, args)
    try:
        model = args.model.resolve().name
        rows = {"local engine": local}
        if eager is not None:
            rows["local engine, eager"] = eager
        for name, stream, clients in (
            ("API, one answer", False, 1),
            ("API, one stream", True, 1),
            (f"API, {args.streams} streams", True, args.streams),
        ):
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows[name] = asyncio.run(api_tok_s(url, model, args, stream=stream, clients=clients))
    finally:
        host.terminate()
        host.wait(timeout=30)
    print(f"{'path':<22} {'tok/s':>9} {'x local':>9}")
    for name, tok_s in rows.items():
        print(f"{name:<22} {tok_s:>9.1f} {tok_s / local:>9.2f}")
    print(json.dumps({
        "bench": "api", "model": model, "device": args.device, "dtype": args.dtype, "tokens": args.tokens,
        "tok_s": {k: round(v, 1) for k, v in rows.items()},
        "ratio_to_local": {k: round(v / local, 3) for k, v in rows.items()},
    }))


if __name__ == "__main__":
    main()
