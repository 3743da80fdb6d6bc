"""Distributed inference against one node, side by side in one run.

    python bench/pipeline.py                     # CPU: tiny and cpu-75m shapes, loopback
    python bench/pipeline.py --shapes cpu-75m --new-tokens 64

For each model shape (random weights, fp32): one node (the local engine, in this process), then
rooms of 1, 2 and 3 real `peerpipe` processes on loopback, each node allowed just enough memory
to force that many stages. Measured through the host, as a client sees it:
decode tok/s of one answer; time to first token of a 512-token prompt; with 3 stages, aggregate
tok/s of 1, 4, 16 (and on GPUs 64) concurrent answers; the planner's predicted ms/token next to
the measured one. Ratios are against the one-node engine (and on GPUs its CUDA-graph run too);
--pin puts every node, and the one node, on a core of its own with one thread. Prints a table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from peerpipe.cli.main import quiet_openmp  # noqa: E402

quiet_openmp()  # as every node process does (before torch loads): the one node here idles beside the rooms

import hops  # noqa: E402
from engine import SHAPES  # noqa: E402
from namespaces import Namespaces  # noqa: E402 (wire.py and weights.py take it from here)
from one_node import LONG_PROMPT, PROMPT_LEN, Local, local_baseline  # noqa: E402

from peerpipe.devtools.tiny_model import tiny_config, write_random_model  # noqa: E402

SHAPES = {
    **SHAPES,
    "tiny": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    # Real sizes, drawn on the device from a seed (engine/random_weights.py): no checkpoint on disk.
    "llama-3-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}
CODE = "5-bench-pipeline"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Proc:
    """A peerpipe process whose stdout lines we wait for."""

    def __init__(self, *args: str, env: dict[str, str], prefix: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "peerpipe", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            seen.append(line.strip())
            if m := re.search(pattern, line):
                return m
        raise TimeoutError(f"no {pattern!r} within {timeout:g} s; saw {seen[-5:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:  # as Ctrl-C would: the node says goodbye, traces are flushed
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def ask(address: tuple[str, int], prompts: list[list[int]], new_tokens: int) -> tuple[list, float]:
    """Send every prompt at once over one connection; the answers and the wall time."""
    from peerpipe.protocol import GenerateDone, GenerateRequest, Sampling
    from peerpipe.room import MessageFrom, RoomNode, parse_code

    async with RoomNode(parse_code(CODE), name="bench") as node:
        peer = await node.dial(address)
        ids = [uuid.uuid4().hex for _ in prompts]
        start = time.perf_counter()
        for rid, prompt in zip(ids, prompts, strict=True):
            request = GenerateRequest(
                rid, "", Sampling(temperature=0.0, max_tokens=new_tokens, ignore_eos=True), prompt_ids=tuple(prompt)
            )
            await node.send(peer.node_id, request)
        done: dict[str, GenerateDone] = {}
        async for event in node.events():
            if isinstance(event, MessageFrom) and isinstance(event.message, GenerateDone):
                if event.message.error:
                    raise RuntimeError(event.message.error)
                done[event.message.request_id] = event.message
                if len(done) == len(ids):
                    break
        return [done[r] for r in ids], time.perf_counter() - start


CONTEXT = LONG_PROMPT + 128


def memory_cap(model: Path, dtype: str, layers: int, stages: int, sessions: int) -> list[str]:
    """``--memory`` that lets a node hold its share of the layers (plus embedding or head) and no
    more, so the planner must use ``stages`` nodes."""
    from peerpipe.cluster.model_choice import ModelChoice
    from peerpipe.plan import Budget, stage_memory

    if stages == 1:
        return []
    spec = ModelChoice.from_dir(model, dtype).spec
    per_node = -(-layers // stages)
    budget = Budget(CONTEXT, sessions)
    need = max(stage_memory(spec, budget, 0, per_node), stage_memory(spec, budget, layers - per_node, layers))
    return ["--memory", f"{need / 0.9 / 1e9 + 1e-9:.9f}"]


def room(
    model: Path, stages: int, layers: int, env: dict[str, str], sessions: int, args: argparse.Namespace
) -> tuple[list[Proc], tuple[str, int]]:
    context = CONTEXT
    memory = memory_cap(model, args.dtype, layers, stages, sessions)
    common = ["--device", args.device, *memory]
    gpus = args.gpus

    def on_gpu(i: int) -> dict[str, str]:
        return {**env, "CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus else env

    def pinned(i: int) -> tuple[str, ...]:  # --pin: node i on core i (and --threads 1 below)
        return ("taskset", "-c", str(i % (os.cpu_count() or 1))) if args.pin else ()

    threads = ["--threads", "1"] if args.pin else []

    host = Proc(
        "host", "--listen", "127.0.0.1:0", "--no-mdns", "--code", CODE, "--name", "h", "--model", str(model),
        "--dtype", args.dtype, "--expect-nodes", str(stages), "--context", str(context), "--sessions", str(sessions),
        "--wire", args.wire, "--speculate", args.speculate, *common, *threads, env=on_gpu(0), prefix=pinned(0),
    )
    port = int(host.expect(r"^listening on 127\.0\.0\.1:(\d+)$").group(1))
    procs = [host]
    for i in range(stages - 1):
        procs.append(
            Proc("join", CODE, "--peer", f"127.0.0.1:{port}", "--listen", "127.0.0.1", "--name", f"m{i}",
                 "--model", str(model), *common, *threads, env=on_gpu(i + 1), prefix=pinned(i + 1))
        )
    host.expect(r"^ready: ")
    return procs, ("127.0.0.1", port)


def predicted_ms(address: tuple[str, int], env: dict[str, str], prefix: tuple[str, ...] = ()) -> tuple[float, int]:
    out = subprocess.run(
        [*prefix, sys.executable, "-m", "peerpipe", "status", "--json", "--code", CODE, "--peer",
         f"{address[0]}:{address[1]}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    data = json.loads(out.stdout)
    stages = data["plan"]["stages"]
    log("planned layers: " + " ".join(f"[{s['start']}, {s['end']})" for s in stages) + f"; lanes {data['plan'].get('lanes')}")
    return float(data["plan"]["predicted_ms_per_token"]), len(stages)


def bench_shape(shape: str, root: Path, env: dict[str, str], args: argparse.Namespace) -> dict:
    from peerpipe.cluster.benchmark import BenchCache
    from peerpipe.cluster.capabilities import detect
    from peerpipe.engine.config import ModelConfig

    model = root / shape
    if not (model / "config.json").is_file():
        on_device = args.device != "cpu"  # GPU nodes draw their layers themselves: nothing to write
        log(f"writing a random {shape} {'folder (weights drawn on the device)' if on_device else 'checkpoint'}")
        write_random_model(model, tiny_config("llama", **SHAPES[shape]), seed=0, dtype=args.dtype, on_device=on_device)
    cfg = ModelConfig.from_dir(model)
    log(f"{shape}: timing a layer once for every node (they share this machine)")
    if args.device == "cpu":
        BenchCache(detect("cpu")).layer(cfg, args.dtype)
    log(f"{shape}: one node, local engine")
    local = Local(model, args.new_tokens, args.device, args.dtype, pin=args.pin)
    base = local.figures(args.repeats)
    paired = args.device == "cpu"  # on a GPU the rooms need the memory the engine holds
    if not paired:
        local.close()
    rows = {"shape": shape, "layers": cfg.n_layers, "local": base, "rooms": []}
    if args.device != "cpu":
        rows["local_cuda_graphs"] = local_baseline(model, args.new_tokens, args.repeats, args.device, args.dtype, True)
    prompt = [10 + i % 200 for i in range(PROMPT_LEN)]
    long = [10 + i % 200 for i in range(LONG_PROMPT)]
    for stages in [int(s) for s in args.stages.split(",")]:
        log(f"{shape}: room with {stages} stage(s)")
        # Each node takes every core, its default as a user starts it: one answer's stages take
        # turns, and with OpenMP's spin short (quiet_openmp) an idle node no longer holds the
        # cores the busy one needs. --node-threads gives each a share instead.
        threads = 1 if args.pin else args.node_threads or (os.cpu_count() or 1)
        node_env = {**env, "OMP_NUM_THREADS": str(threads)}
        kept = Path(args.trace_dir) if args.trace_dir else root  # --trace-dir keeps the raw traces
        traces, streamed = kept / f"trace-{shape}-{stages}", set()  # the 16 answers' ids, once run
        if args.trace:
            shutil.rmtree(traces, ignore_errors=True)
            node_env["PEERPIPE_TRACE"] = str(traces)
        procs, address = room(model, stages, cfg.n_layers, node_env, 16, args)
        try:
            predicted, planned = predicted_ms(address, env)
            asyncio.run(ask(address, [prompt], 4))  # warm-up
            singles, ratios = [], []
            for _ in range(args.repeats):
                alone = local.decode_tok_s() if paired else base["tok_s"]
                singles.append(asyncio.run(ask(address, [prompt], args.new_tokens))[0][0])
                ratios.append((len(singles[-1].tokens) - 1) / singles[-1].decode_s / alone)
            tok_s = statistics.median((len(d.tokens) - 1) / d.decode_s for d in singles)
            ttfts = [asyncio.run(ask(address, [long], 1))[0][0].prefill_s for _ in range(args.repeats)]
            entry = {
                "stages": planned,
                "threads_per_node": threads,
                "tok_s": tok_s,
                "vs_local": statistics.median(ratios),  # of rounds paired with a local one (CPU)
                "ttft_s": statistics.median(ttfts),
                "ttft_vs_local": statistics.median(ttfts) / base["ttft_s"],
                "predicted_ms": predicted,
                "measured_ms": 1e3 / tok_s,
            }
            if graphs := rows.get("local_cuda_graphs"):
                entry["vs_local_graphs"] = tok_s / graphs["tok_s"]
            if stages == max(int(s) for s in args.stages.split(",")):
                streams = {}
                for n in (1, 4, 16, 64) if args.device != "cpu" else (1, 4, 16):
                    answers, wall = asyncio.run(ask(address, [prompt] * n, args.new_tokens))
                    streams[n] = sum(len(a.tokens) for a in answers) / wall
                    streamed = {a.request_id for a in answers} if n == 16 else streamed
                entry["aggregate_tok_s"] = streams
                entry["16_vs_1"] = streams[16] / streams[1]
                entry["streams_at_stages"] = stages
            rows["rooms"].append(entry)
        finally:
            for p in reversed(procs):
                p.stop()
        if args.trace:
            entry.update(hops.room_parts(traces, planned, {d.request_id for d in singles}, streamed))
    if paired:
        local.close()
    return rows


def netns_room(model: Path, layers: int, nets: Namespaces, env: dict[str, str], args: argparse.Namespace):  # type: ignore[no-untyped-def]
    stages = len(nets.names)
    context = CONTEXT
    common = ["--device", "cpu", *memory_cap(model, args.dtype, layers, stages, 16)]
    host = Proc(
        "host", "--listen", f"{nets.ips[0]}:0", "--no-mdns", "--code", CODE, "--name", "h", "--model", str(model),
        "--dtype", args.dtype, "--expect-nodes", str(stages), "--context", str(context), "--sessions", "16",
        *common, env=env, prefix=nets.prefix(0),
    )
    port = int(host.expect(r"^listening on [\d.]+:(\d+)$").group(1))
    procs = [host]
    for i in range(1, stages):
        procs.append(
            Proc("join", CODE, "--peer", f"{nets.ips[0]}:{port}", "--listen", nets.ips[i], "--name", f"m{i}",
                 "--model", str(model), *common, env=env, prefix=nets.prefix(i))
        )
    host.expect(r"^ready: ", timeout=180)
    return procs, (nets.ips[0], port)


def client(address: tuple[str, int], prefix: tuple[str, ...], env: dict[str, str], count: int, prompt_len: int,
           new_tokens: int) -> dict:
    """Run the asking client inside the host's namespace (this process cannot reach it)."""
    out = subprocess.run(
        [*prefix, sys.executable, str(Path(__file__).resolve()), "--client", f"{address[0]}:{address[1]}",
         "--count", str(count), "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def client_main(args: argparse.Namespace) -> None:
    host, _, port = args.client.rpartition(":")
    prompt = [10 + i % 200 for i in range(args.prompt_len)]
    answers, wall = asyncio.run(ask((host, int(port)), [prompt] * args.count, args.new_tokens))
    print(json.dumps({
        "tok_s": [(len(a.tokens) - 1) / a.decode_s if a.decode_s > 0 else 0.0 for a in answers],
        "prefill_s": [a.prefill_s for a in answers],
        "aggregate_tok_s": sum(len(a.tokens) for a in answers) / wall,
    }))


def bench_netns(shape: str, root: Path, env: dict[str, str], args: argparse.Namespace, local: dict) -> list[dict]:
    from peerpipe.engine.config import ModelConfig

    if shutil.which("ip") is None or shutil.which("tc") is None or os.geteuid() != 0:
        log("skipping the network-namespace runs: they need root, ip and tc")
        return []
    model = root / shape
    layers = ModelConfig.from_dir(model).n_layers
    rows = []
    for delay_ms, rate in ((1, "1gbit"), (5, "1gbit"), (1, "100mbit"), (5, "100mbit")):
        log(f"{shape}: 3 namespaces, +{delay_ms} ms per hop, {rate}")
        node_env = {**env, "PEERPIPE_LINK_DELAY_MS": str(delay_ms),
                    "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 3))}
        with Namespaces(3, rate) as nets:
            procs, address = netns_room(model, layers, nets, node_env, args)
            try:
                predicted, planned = predicted_ms(address, env, nets.prefix(0))
                client(address, nets.prefix(0), env, 1, PROMPT_LEN, 4)
                single = [client(address, nets.prefix(0), env, 1, PROMPT_LEN, args.new_tokens) for _ in range(args.repeats)]
                tok_s = statistics.median(s["tok_s"][0] for s in single)
                ttft = statistics.median(
                    client(address, nets.prefix(0), env, 1, LONG_PROMPT, 1)["prefill_s"][0] for _ in range(args.repeats)
                )
                many = client(address, nets.prefix(0), env, 16, PROMPT_LEN, args.new_tokens)["aggregate_tok_s"]
                rows.append({
                    "delay_ms": delay_ms, "rate": rate, "stages": planned, "tok_s": tok_s,
                    "vs_local": tok_s / local["tok_s"], "ttft_s": ttft, "ttft_vs_local": ttft / local["ttft_s"],
                    "predicted_ms": predicted, "measured_ms": 1e3 / tok_s, "aggregate_16": many,
                })
            finally:
                for p in reversed(procs):
                    p.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,cpu-75m")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--stages", default="1,2,3", help="room sizes to run (1,2,3)")
    parser.add_argument(
        "--speculate", default="off",
        help="the host's drafting: off (default: like the one node it is compared with) or ngram (a room's default)",
    )
    parser.add_argument(
        "--wire", default="auto", help="the host's --wire: auto (shared memory between nodes of this machine), native (the socket)"
    )
    parser.add_argument("--gpus", type=int, default=0, help="put node i on GPU i mod GPUS (0: no GPUs)")
    parser.add_argument("--node-threads", type=int, default=0, help="CPU threads per node process (default: every core)")
    parser.add_argument("--netns-shapes", default="cpu-75m", help="shapes to also run across namespaces ('' = none)")
    parser.add_argument("--pin", action="store_true", help="CPU: the one node and every room node on a core each, one thread")
    parser.add_argument("--trace", action="store_true", help="time each part of a token's path, hop by hop (bench/hops.py)")
    parser.add_argument("--trace-dir", default="", help="with --trace: keep each room's raw traces in this folder")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PEERPIPE_CACHE": str(Path(tmp) / "cache"), "PYTHONUNBUFFERED": "1"}
        os.environ["PEERPIPE_CACHE"] = env["PEERPIPE_CACHE"]
        for shape in args.shapes.split(","):
            results.append(bench_shape(shape, Path(tmp), env, args))
            if shape in args.netns_shapes.split(",") and args.device == "cpu":
                results[-1]["netns"] = bench_netns(shape, Path(tmp), env, args, results[-1]["local"])
    print(f"{'shape':>8} {'stages':>6} {'tok/s':>8} {'vs 1 node':>9} {'TTFT 512':>9} {'vs 1 node':>9} {'pred ms':>8} {'meas ms':>8}  streams 1/4/16(/64) tok/s")
    for r in results:
        base = r["local"]
        print(f"{r['shape']:>8} {'local':>6} {base['tok_s']:>8.1f} {1.0:>9.2f} {base['ttft_s'] * 1e3:>7.1f}ms {1.0:>9.2f}")
        if graphs := r.get("local_cuda_graphs"):
            print(f"{'':>8} {'graphs':>6} {graphs['tok_s']:>8.1f} {graphs['tok_s'] / base['tok_s']:>9.2f}  (local engine with CUDA graphs)")
        for e in r["rooms"]:
            streams = e.get("aggregate_tok_s")
            extra = (
                "  " + " / ".join(f"{v:.0f}" for v in streams.values()) + f" ({e['16_vs_1']:.2f}x at 16)" if streams else ""
            )
            if "vs_local_graphs" in e:
                extra += f"  {e['vs_local_graphs']:.2f}x the engine with graphs"
            print(
                f"{r['shape']:>8} {e['stages']:>6} {e['tok_s']:>8.1f} {e['vs_local']:>9.2f} {e['ttft_s'] * 1e3:>7.1f}ms "
                f"{e['ttft_vs_local']:>9.2f} {e['predicted_ms']:>8.2f} {e['measured_ms']:>8.2f}{extra}"
            )
    for line in (line for r in results for line in hops.report(r["shape"], r["rooms"])):
        print(line)
    for r in results:
        for e in r.get("netns", []):
            print(
                f"{r['shape']:>8} netns +{e['delay_ms']}ms/{e['rate']:>7}: {e['stages']} stages {e['tok_s']:.1f} tok/s "
                f"({e['vs_local']:.2f}x), TTFT {e['ttft_s'] * 1e3:.0f} ms ({e['ttft_vs_local']:.2f}x), "
                f"pred {e['predicted_ms']:.1f} / meas {e['measured_ms']:.1f} ms, 16 streams {e['aggregate_16']:.0f} tok/s"
            )
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
