"""Hidden states as int8 or 16 bits against the model's dtype, over capped links, side by side.

    sudo python bench/wire.py                       # 3 namespaces, 100 Mbit/s links, the bundled model
    sudo python bench/wire.py --rate 1gbit --prompt-len 512
    sudo python bench/wire.py --device cuda --dtype bfloat16 --shape llama-3.2-1b   # GPU nodes, random weights

Three `peerpipe` processes, each in a network namespace of its own on one bridge, every link
capped by ``tc tbf``; the host starts with ``--wire native``, ``bf16``, ``int8`` and ``fp8`` in
turn (and ``auto``, which must pick int8 on such a link). For each: time to first token of a long prompt,
decode tok/s of a short one, and what the plan chose. Ratios are against ``native`` in the same
run. Needs root, ``ip`` and ``tc``. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pipeline  # noqa: E402
from pipeline import CODE, Namespaces, Proc, client, log, memory_cap  # noqa: E402

CONTEXT = 1024
pipeline.CONTEXT = CONTEXT  # the memory caps must leave room for a 1k-token prompt's KV cache


def room(model: Path, wire: str, nets: Namespaces, env: dict[str, str], args: argparse.Namespace) -> tuple[list[Proc], tuple[str, int]]:
    from peerpipe.engine.config import ModelConfig

    layers = ModelConfig.from_dir(model).n_layers
    common = ["--device", args.device, *memory_cap(model, args.dtype, layers, 3, 4)]
    host = Proc(
        "host", "--listen", f"{nets.ips[0]}:0", "--no-mdns", "--code", CODE, "--name", "h", "--model", str(model),
        "--dtype", args.dtype, "--expect-nodes", "3", "--context", str(CONTEXT), "--sessions", "4", "--wire", wire,
        "--speculate", "off", "--http", "off", "--prefill-chunk", args.prefill_chunk, *common, env=env,
        prefix=nets.prefix(0),
    )
    port = int(host.expect(r"^listening on [\d.]+:(\d+)$").group(1))
    procs = [host]
    for i in (1, 2):
        procs.append(Proc("join", CODE, "--peer", f"{nets.ips[0]}:{port}", "--listen", nets.ips[i], "--name", f"m{i}",
                          "--model", str(model), *common, env=env, prefix=nets.prefix(i)))
    host.expect(r"^ready: ", timeout=300)
    return procs, (nets.ips[0], port)


def plan_wires(address: tuple[str, int], prefix: tuple[str, ...], env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [*prefix, sys.executable, "-m", "peerpipe", "status", "--json", "--code", CODE, "--peer", f"{address[0]}:{address[1]}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    return [s["wire"] for s in json.loads(out.stdout)["plan"]["stages"]]


def run(args: argparse.Namespace) -> dict:
    from peerpipe.models import default_model_dir

    model = Path(args.model) if args.model else default_model_dir()
    if args.shape:
        from peerpipe.devtools.tiny_model import tiny_config, write_random_model

        model = ROOT / ".bench" / f"{args.shape}-{args.dtype}"
        if not (model / "config.json").is_file():
            log(f"writing a random {args.shape} folder")
            write_random_model(model, tiny_config("llama", **pipeline.SHAPES[args.shape]), seed=0, dtype=args.dtype,
                               on_device=args.device != "cpu")
    env = {k: v for k, v in os.environ.items() if k != "PEERPIPE_LINK_DELAY_MS"}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // 3))
    rows = []
    with Namespaces(3, args.rate) as nets:
        for wire in args.wires.split(","):
            log(f"--wire {wire}, 3 namespaces at {args.rate}")
            procs, address = room(model, wire, nets, env, args)
            try:
                chosen = plan_wires(address, nets.prefix(0), env)
                client(address, nets.prefix(0), env, 1, args.prompt_len, 1)  # warm every stage
                ttft = statistics.median(
                    client(address, nets.prefix(0), env, 1, args.prompt_len, 1)["prefill_s"][0] for _ in range(args.repeats)
                )
                tok_s = statistics.median(
                    client(address, nets.prefix(0), env, 1, 32, args.new_tokens)["tok_s"][0] for _ in range(args.repeats)
                )
                rows.append({"wire": wire, "chosen": chosen, "ttft_s": round(ttft, 4), "tok_s": round(tok_s, 2)})
                log(f"  plan {chosen}: TTFT {ttft * 1e3:.0f} ms, {tok_s:.1f} tok/s")
            finally:
                for p in reversed(procs):
                    p.stop()
    native = rows[0]
    for r in rows:
        r["ttft_speedup"] = round(native["ttft_s"] / r["ttft_s"], 3)
        r["tok_s_ratio"] = round(r["tok_s"] / native["tok_s"], 3)
    return {"model": args.shape or model.name, "device": args.device, "dtype": args.dtype, "rate": args.rate,
            "prompt_len": args.prompt_len, "prefill_chunk": args.prefill_chunk, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a model folder (default: the bundled model)")
    p.add_argument("--shape", default="", help="a random model of this shape (bench/pipeline.py's) instead")
    p.add_argument("--device", default="cpu", help="the nodes' device (cpu)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--wires", default="native,bf16,int8,fp8,auto", help="the --wire settings to run, the first is 1.00")
    p.add_argument("--rate", default="100mbit", help="tc tbf rate of every link (100mbit)")
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--prefill-chunk", default="0",
                   help="the host's --prefill-chunk (0: whole prompts, so each hop's transfer is in the time to first "
                        "token; auto varies with the measured token time, near its 20 ms threshold here)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if shutil.which("ip") is None or shutil.which("tc") is None or os.geteuid() != 0:
        sys.exit("bench/wire.py needs root, ip and tc (network namespaces)")
    began = time.perf_counter()
    result = run(args)
    print(f"{'wire':8} {'plan':22} {'TTFT ms':>8} {'speedup':>8} {'tok/s':>8} {'ratio':>6}")
    for r in result["rows"]:
        print(f"{r['wire']:8} {','.join(w or '-' for w in r['chosen']):22} {r['ttft_s'] * 1e3:8.0f} "
              f"{r['ttft_speedup']:8.2f} {r['tok_s']:8.2f} {r['tok_s_ratio']:6.2f}")
    result["goal_int8_ttft_ge_2x"] = next((r["ttft_speedup"] for r in result["rows"] if r["wire"] == "int8"), None)
    result["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
