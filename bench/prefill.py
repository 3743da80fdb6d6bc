"""Pipelined prefill: a long prompt's time to first token in rooms of 2 and 3 stages, sent whole
(the competitor: what the room did before, and what a pipeline without chunks does) against
chunks of 256 and 128 tokens (the default), and the local engine, side by side in one run.

    python bench/prefill.py                          # cpu-75m, prompts of 512 and 1024 tokens
    python bench/prefill.py --device cuda --dtype bfloat16 --shape llama-3.2-1b --gpus 1

Every room is real processes on this machine (bench/pipeline.py's helpers). Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pipeline  # noqa: E402
from engine import SHAPES  # noqa: E402
from pipeline import CODE, Proc, ask, log, memory_cap  # noqa: E402

from peerpipe.devtools.tiny_model import tiny_config, write_random_model  # noqa: E402


def start(model: Path, stages: int, layers: int, chunk: str, args: argparse.Namespace) -> tuple[list[Proc], tuple[str, int]]:
    threads = max(1, (os.cpu_count() or 1) // (1 if args.gpus else stages))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("PEERPIPE_LINK_DELAY_MS", None)
    common = ["--device", args.device, *memory_cap(model, args.dtype, layers, stages, 2)]

    def on_gpu(i: int) -> dict[str, str]:
        return {**env, "CUDA_VISIBLE_DEVICES": str(i % args.gpus)} if args.gpus else env

    host = Proc(
        "host", "--listen", "127.0.0.1:0", "--no-mdns", "--code", CODE, "--name", "h", "--model", str(model),
        "--dtype", args.dtype, "--expect-nodes", str(stages), "--context", str(pipeline.CONTEXT), "--sessions", "2",
        "--speculate", "off", "--http", "off", "--prefill-chunk", chunk, *common, env=on_gpu(0),
    )
    port = int(host.expect(r"^listening on 127\.0\.0\.1:(\d+)$").group(1))
    procs = [host]
    for i in range(1, stages):
        procs.append(Proc("join", CODE, "--peer", f"127.0.0.1:{port}", "--listen", "127.0.0.1", "--name", f"m{i}",
                          "--model", str(model), *common, env=on_gpu(i)))
    host.expect(r"^ready: ", timeout=300)
    return procs, ("127.0.0.1", port)


def ttft(address: tuple[str, int], length: int, repeats: int) -> float:
    prompt = [10 + i % 200 for i in range(length)]
    asyncio.run(ask(address, [prompt], 1))  # warm-up
    return statistics.median(asyncio.run(ask(address, [prompt], 1))[0][0].prefill_s for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="cpu-75m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--prompts", default="512,1024")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--chunks", default="0,256,128,auto", help="--prefill-chunk values to run (0: whole)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    lengths = [int(n) for n in args.prompts.split(",")]
    pipeline.CONTEXT = max(lengths) + 64  # the memory caps must leave room for the longest prompt's KV
    began = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_random_model(Path(tmp) / args.shape, tiny_config("llama", **SHAPES[args.shape]), dtype=args.dtype)
        from peerpipe.engine.config import ModelConfig
        from peerpipe.engine.generate import LocalEngine
        from peerpipe.engine.sampling import SamplingParams

        layers = ModelConfig.from_dir(model).n_layers
        engine, _ = LocalEngine.from_dir(model, device=args.device, dtype=args.dtype, max_seq=pipeline.CONTEXT)
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        local = {}
        for n in lengths:
            prompt = [10 + i % 200 for i in range(n)]
            engine.generate(prompt, one)
            local[n] = statistics.median(engine.generate(prompt, one).prefill_s for _ in range(args.repeats))
        del engine
        for stages in [int(s) for s in args.stages.split(",")]:
            for chunk in args.chunks.split(","):
                log(f"{stages} stages, --prefill-chunk {chunk}")
                procs, address = start(model, stages, layers, chunk, args)
                try:
                    for n in lengths:
                        t = ttft(address, n, args.repeats)
                        rows.append({"stages": stages, "chunk": chunk, "prompt": n, "ttft_s": t, "vs_local": t / local[n]})
                finally:
                    for proc in reversed(procs):
                        proc.stop()
    whole = {(r["stages"], r["prompt"]): r["ttft_s"] for r in rows if r["chunk"] == "0"}
    print(f"{'stages':>6} {'chunk':>6} {'prompt':>7} {'TTFT ms':>8} {'vs local':>9} {'vs whole':>9}")
    for r in rows:
        r["speedup_vs_whole"] = whole[(r["stages"], r["prompt"])] / r["ttft_s"]
        print(f"{r['stages']:>6} {'whole' if r['chunk'] == '0' else r['chunk']:>6} {r['prompt']:>7} {r['ttft_s'] * 1e3:>8.1f} "
              f"{r['vs_local']:>9.2f} {r['speedup_vs_whole']:>9.2f}")
    best = max((r["speedup_vs_whole"] for r in rows if r["chunk"] == "auto"), default=0.0)
    print(json.dumps({"shape": args.shape, "device": args.device, "local_ttft_s": local, "rows": rows,
                      "best_speedup_auto": best, "seconds": round(time.perf_counter() - began, 1)}))


if __name__ == "__main__":
    main()
