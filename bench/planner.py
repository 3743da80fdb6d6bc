"""The planner: how long planning takes, how the strategies compare, and how well the cost model
predicts a real decode step.

    python bench/planner.py                      # CPU: planning speed + the cpu-75m shape on one node
    python bench/planner.py --device cuda --shape llama-3.2-1b --dtype bfloat16

Part 1 plans rooms of 8 to 64 hypothetical nodes (mixed devices and memory) over 32 and 80 layers,
on uniform and on measured (unequal) links, with both strategies, and reports the planning time
and the optimal plan's predicted speed as a ratio of the proportional one's.
Part 2 calibrates the cost model on this machine: it times one layer of the shape (what every node
does when it joins a room), predicts one node's ms/token with the planner, then runs the engine on
a random checkpoint of that shape and reports measured / predicted. (Across a real room, the same
comparison comes with distributed inference.) Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine import SHAPES  # noqa: E402

from peerpipe.plan import Budget, Link, ModelSpec, Network, NodeSpec, make_plan  # noqa: E402

DEVICES = [  # (kind, memory GB, fp16 TFLOPS, memory GB/s): a mixed home lab
    ("gpu-24g", 24, 82, 1000),
    ("gpu-12g", 12, 30, 360),
    ("laptop", 16, 4, 100),
    ("mac", 32, 14, 400),
    ("old-ws", 48, 10, 300),
    ("cpu", 64, 1.5, 60),
]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def room(n: int, layers: int, measured: bool, seed: int) -> tuple[ModelSpec, list[NodeSpec], Network]:
    rng = random.Random(seed)
    # A 70B-class layer in bf16 (~0.86 GB), 128k vocabulary.
    spec = ModelSpec("bench", layers, 856_000_000, 1_050_000_000, 1_050_000_000, 327_680 // 80, 16_384, 1_712_000_000)
    nodes = []
    for i in range(n):
        kind, mem, tflops, gbps = DEVICES[rng.randrange(len(DEVICES))]
        nodes.append(NodeSpec.estimated(f"{kind}-{i}", spec, memory_bytes=int(mem * 1e9), tflops=tflops, memory_gbps=gbps))
    links = {}
    if measured:
        ids = [node.node_id for node in nodes]
        for a in range(n):
            for b in range(a + 1, n):
                wifi = ids[a].startswith("laptop") or ids[b].startswith("laptop")
                links[(ids[a], ids[b])] = Link(rng.uniform(2, 6) if wifi else rng.uniform(0.2, 0.6), 12e6 if wifi else 117e6)
    return spec, nodes, Network(links)


def planning(repeats: int) -> list[dict]:
    rows = []
    for layers in (32, 80):
        for n in (8, 16, 32, 64):
            for measured in (False, True):
                times, ratios, exact = [], [], True
                for seed in range(repeats):
                    spec, nodes, network = room(n, layers, measured, seed)
                    budget = Budget(context_tokens=4096)
                    start = time.perf_counter()
                    optimal = make_plan(spec, nodes, network, budget)
                    times.append(time.perf_counter() - start)
                    proportional = make_plan(spec, nodes, network, budget, strategy="proportional")
                    ratios.append(proportional.predicted_ms_per_token / optimal.predicted_ms_per_token)
                    exact = exact and optimal.exact
                rows.append(
                    {
                        "layers": layers,
                        "nodes": n,
                        "links": "measured" if measured else "uniform",
                        "plan_s_max": max(times),
                        "plan_s_median": statistics.median(times),
                        "speedup_vs_proportional": statistics.median(ratios),
                        "exact": exact,
                    }
                )
                log(f"{layers} layers x {n} nodes ({rows[-1]['links']}): {max(times) * 1e3:.1f} ms")
    return rows


def calibrate(shape: str, device: str, dtype: str, new_tokens: int) -> dict:
    import torch

    from peerpipe.cluster.benchmark import bench_layer
    from peerpipe.devtools.tiny_model import tiny_config, write_random_model
    from peerpipe.engine.config import ModelConfig
    from peerpipe.engine.generate import LocalEngine
    from peerpipe.engine.loader import load_stage
    from peerpipe.engine.sampling import SamplingParams
    from peerpipe.engine.tokenizer import Tokenizer

    raw = tiny_config("llama", **SHAPES[shape])
    cfg = ModelConfig.from_hf(raw)
    itemsize = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    log(f"timing one layer of {shape} on {device} in {dtype}")
    timing = bench_layer(cfg, device, dtype)
    spec = ModelSpec.from_config(cfg, shape, itemsize)
    node = NodeSpec.measured(
        "here",
        spec,
        memory_bytes=1 << 40,
        decode_layer_ms=timing.decode_ms,
        prefill_layer_ms=timing.prefill_ms,
        prefill_tokens=timing.prefill_tokens,
        measured_layer_bytes=timing.layer_bytes,
        stage_ms=timing.stage_overhead_ms,
    )
    predicted = make_plan(spec, [node], budget=Budget(context_tokens=512)).predicted_ms_per_token
    with tempfile.TemporaryDirectory() as tmp:
        log("writing a random checkpoint")
        path = write_random_model(Path(tmp) / "m", raw, dtype=dtype)
        stage, _ = load_stage(path, device=device, dtype=dtype)
        # On CUDA the layer is timed as stages run it, replayed from a graph: so is the engine here.
        engine = LocalEngine(
            stage, Tokenizer.from_dir(path), max_seq=64 + new_tokens, cuda_graphs=device.startswith("cuda")
        )
        prompt = list(range(5, 37))
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        engine.generate(prompt, params)  # warm-up
        runs = [engine.generate(prompt, params) for _ in range(3)]
    measured = statistics.median(r.decode_s / max(1, len(r.tokens) - 1) * 1e3 for r in runs)
    return {
        "shape": shape,
        "device": device,
        "dtype": dtype,
        "layer_decode_ms": timing.decode_ms,
        "stage_overhead_ms": timing.stage_overhead_ms,
        "predicted_ms_per_token": predicted,
        "measured_ms_per_token": measured,
        "measured_over_predicted": measured / predicted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="cpu-75m", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5, help="random rooms per size (5)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-calibration", action="store_true")
    args = parser.parse_args()
    rows = planning(args.repeats)
    print(f"{'layers':>6} {'nodes':>5} {'links':>8} {'plan max':>9} {'median':>8} {'optimal vs proportional':>24} exact")
    for r in rows:
        print(
            f"{r['layers']:>6} {r['nodes']:>5} {r['links']:>8} {r['plan_s_max'] * 1e3:>7.1f}ms "
            f"{r['plan_s_median'] * 1e3:>6.1f}ms {r['speedup_vs_proportional']:>23.2f}x {r['exact']}"
        )
    result = {"planning": rows, "max_plan_s_64x80": max(r["plan_s_max"] for r in rows if r["nodes"] == 64 and r["layers"] == 80)}
    if not args.skip_calibration:
        cal = calibrate(args.shape, args.device, args.dtype, args.new_tokens)
        print(
            f"\n{cal['shape']} on {cal['device']} ({cal['dtype']}): one layer {cal['layer_decode_ms']:.3f} ms "
            f"+ {cal['stage_overhead_ms']:.3f} ms per stage; "
            f"predicted {cal['predicted_ms_per_token']:.2f} ms/token, measured {cal['measured_ms_per_token']:.2f} "
            f"(measured / predicted = {cal['measured_over_predicted']:.2f})"
        )
        result["calibration"] = cal
    print(json.dumps(result))


if __name__ == "__main__":
    main()
