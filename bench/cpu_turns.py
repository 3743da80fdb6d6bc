"""Stages as bare processes taking turns on one machine's cores, with no room around them.

    python bench/cpu_turns.py                      # 75M shape, 3 stages, 2 threads each

Each stage process loads its layers, takes the previous one's output from a queue, forwards it
and passes it on; the last one draws the greedy token and hands it back to the first. Against
one process holding every layer, with OpenMP's idle spin short (what peerpipe's nodes set,
cli/main.quiet_openmp), none, and at the runtime's default, the variants alternating round by round.
What is left between the two layouts is what sharing the cores costs, before any socket,
encryption or event loop; a room that loses more than this loses it in its own code. Prints a
table (ms per token, per layer inside each process) and one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SPINS = {  # OpenMP's idle wait, as each variant's processes start with it
    "short spin": {"GOMP_SPINCOUNT": "2000", "KMP_BLOCKTIME": "1"},  # cli/main.OPENMP_SPIN
    "no spin": {"GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": "0"},
    "default spin": {},
}


def _write(path: Path, shape: str) -> None:
    from engine import SHAPES

    from peerpipe.devtools.tiny_model import tiny_config, write_random_model

    write_random_model(path, tiny_config("llama", **SHAPES[shape]), seed=0, dtype="float32")


def _stage(path: Path, start: int, end: int, threads: int, inbox: mp.Queue, outbox: mp.Queue, report: mp.Queue) -> None:
    import torch

    from peerpipe.engine.loader import load_stage

    torch.set_num_threads(threads)
    stage, _ = load_stage(path, start, end, device="cpu", dtype="float32")
    cache = stage.new_cache(1, 1024)
    slot = cache.alloc()
    report.put("ready")
    took: list[float] = []
    with torch.inference_mode():
        while (x := inbox.get()) is not None:
            began = time.perf_counter()
            t = torch.from_numpy(x)
            y = stage(t, cache, cache.batch([slot], t.shape[1]), last_only=stage.is_last)
            if stage.is_last:
                y = y[:, -1].argmax(-1, keepdim=True)
            took.append(time.perf_counter() - began)
            outbox.put(y.numpy())
    outbox.put(None)
    report.put(statistics.median(took[4:]) * 1e3 / (end - start))


def run(path: Path, ranges: list[tuple[int, int]], threads: int, tokens: int) -> dict[str, object]:
    """ms per token of a chain of processes holding ``ranges``, and each one's ms per layer."""
    import numpy as np

    ctx = mp.get_context("spawn")  # torch's thread pools do not survive a fork
    queues = [ctx.Queue() for _ in range(len(ranges) + 1)]
    reports = [ctx.Queue() for _ in ranges]
    procs = [ctx.Process(target=_stage, args=(path, a, b, threads, queues[i], queues[i + 1], reports[i]))
             for i, (a, b) in enumerate(ranges)]
    for p in procs:
        p.start()
    for r in reports:
        r.get()
    x, took = np.array([[5, 6, 7, 8]], dtype=np.int64), []
    for _ in range(tokens):
        began = time.perf_counter()
        queues[0].put(x)
        x = queues[-1].get()
        took.append(time.perf_counter() - began)
    queues[0].put(None)
    queues[-1].get()
    per_layer = [r.get() for r in reports]
    for p in procs:
        p.join()
    return {"ms_per_token": statistics.median(took[4:]) * 1e3, "ms_per_layer": per_layer}


def main() -> None:
    from engine import SHAPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu-75m")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    path = ROOT / ".bench" / f"turns-{args.shape}"
    if not (path / "config.json").is_file():
        print(f"[bench] writing a random {args.shape} checkpoint", file=sys.stderr, flush=True)
        writer = mp.get_context("spawn").Process(target=_write, args=(path, args.shape))
        writer.start()
        writer.join()
    n = SHAPES[args.shape]["num_hidden_layers"]
    cuts = [round(i * n / args.stages) for i in range(args.stages + 1)]
    layouts = {"one process": [(0, n)], f"{args.stages} processes": list(itertools.pairwise(cuts))}
    results: dict[str, list[dict[str, object]]] = {}
    for r in range(args.rounds):
        for spin, env in SPINS.items():
            for name, ranges in layouts.items():
                for key in SPINS["short spin"]:
                    os.environ.pop(key, None)
                os.environ.update(env)
                print(f"[bench] round {r + 1}/{args.rounds}: {spin}, {name}", file=sys.stderr, flush=True)
                results.setdefault(f"{spin}, {name}", []).append(run(path, ranges, args.threads, args.tokens))
    print(f"{'variant':<30} {'ms/token':>9} {'x one':>6}  ms per layer in each process")
    summary = {}
    for spin in SPINS:
        one = statistics.median(float(x["ms_per_token"]) for x in results[f"{spin}, one process"])  # type: ignore[arg-type]
        for name in layouts:
            runs = results[f"{spin}, {name}"]
            ms = statistics.median(float(x["ms_per_token"]) for x in runs)  # type: ignore[arg-type]
            layers = [statistics.median(x["ms_per_layer"][i] for x in runs) for i in range(len(layouts[name]))]  # type: ignore[index]
            summary[f"{spin}, {name}"] = {"ms_per_token": round(ms, 3), "vs_one": round(one / ms, 3),
                                          "ms_per_layer": [round(v, 3) for v in layers]}
            print(f"{spin + ', ' + name:<30} {ms:>9.2f} {one / ms:>6.2f}  " + " ".join(f"{v:.3f}" for v in layers))
    print(json.dumps({"bench": "cpu_turns", "shape": args.shape, "threads": args.threads, "results": summary}))


if __name__ == "__main__":
    main()
