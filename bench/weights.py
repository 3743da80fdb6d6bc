"""Weights from peers over capped links: transfer rate against the cap and against a plain TCP
stream, join-to-ready, a second join from the cache, and an answer's token latency while a third
node fetches (docs/weights.md).

    sudo python bench/weights.py                    # 100 Mbit/s and 1 Gbit/s, a 16-layer random Llama

Three network namespaces on one bridge, every node's link capped by ``tc tbf`` (bench/pipeline.py's
``Namespaces``). The host has the model; members join with nothing but the code. The competitor is
what people do today: copy the files themselves (a plain, unencrypted TCP stream of the same
bytes, measured between the same namespaces, is its ceiling). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import CODE, Namespaces, Proc, client, log  # noqa: E402

from peerpipe.devtools.tiny_model import tiny_config, write_random_model  # noqa: E402

SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 16,
         "num_key_value_heads": 8, "vocab_size": 8192, "max_position_embeddings": 1024}
FETCHED = re.compile(r"fetching layers .*: 100% of ([\d.]+) MB, ([\d.]+) MB/s")
RATES = {"100mbit": 100e6 / 8, "1gbit": 1e9 / 8, "10gbit": 10e9 / 8}

TCP_SCRIPT = r"""
import socket, sys, time
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept(); got = 0; t0 = None; buf = bytearray(1 << 20)
    while got < n:
        k = c.recv_into(buf)
        if not k: break
        t0 = t0 or time.perf_counter(); got += k
    print(got / (time.perf_counter() - t0), flush=True)
else:
    c = socket.create_connection((host, port)); block = b"\x00" * (1 << 20); left = n
    while left > 0:
        c.sendall(block[: min(left, len(block))]); left -= len(block)
    c.close()
"""


def plain_tcp(nets: Namespaces, nbytes: int, env: dict[str, str]) -> float:
    """Bytes per second of one plain TCP stream from node 0 to node 1 (what copying the files gets)."""
    recv = subprocess.Popen([*nets.prefix(1), sys.executable, "-c", TCP_SCRIPT, "recv", nets.ips[1], "7444", str(nbytes)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert recv.stdout is not None
    recv.stdout.readline()
    subprocess.run([*nets.prefix(0), sys.executable, "-c", TCP_SCRIPT, "send", nets.ips[1], "7444", str(nbytes)],
                   check=True, env=env, timeout=600)
    rate = float(recv.stdout.readline())
    recv.wait(timeout=30)
    return rate


def host_proc(model: Path, nets: Namespaces, env: dict[str, str], nodes: int) -> tuple[Proc, str]:
    host = Proc("host", "--listen", f"{nets.ips[0]}:0", "--no-mdns", "--code", CODE, "--name", "h", "--model", str(model),
                "--dtype", "float32", "--expect-nodes", str(nodes), "--context", "256", "--sessions", "2",
                "--speculate", "off", "--http", "off", "--device", "cpu", "--strategy", "proportional",
                env=env, prefix=nets.prefix(0))
    port = host.expect(r"^listening on [\d.]+:(\d+)$").group(1)
    return host, f"{nets.ips[0]}:{port}"


def member(i: int, address: str, nets: Namespaces, env: dict[str, str], cache: Path) -> Proc:
    return Proc("join", CODE, "--peer", address, "--listen", nets.ips[i], "--name", f"m{i}-{cache.name}", "--device", "cpu",
                env={**env, "PEERPIPE_CACHE": str(cache)}, prefix=nets.prefix(i))


def ms_per_token(address: str, nets: Namespaces, env: dict[str, str], tokens: int) -> float:
    host, _, port = address.rpartition(":")
    tok_s = client((host, int(port)), nets.prefix(0), env, 1, 16, tokens)["tok_s"][0]
    return 1e3 / tok_s


def one_rate(model: Path, rate: str, env: dict[str, str], args: argparse.Namespace) -> dict:
    row: dict = {"rate": rate, "cap_MBps": RATES[rate] / 1e6}
    caches = Path(tempfile.mkdtemp(prefix="pp-weights-"))
    with Namespaces(3, rate) as nets:
        row["tcp_MBps"] = round(plain_tcp(nets, int(args.tcp_mb * 1e6), env) / 1e6, 2)
        log(f"{rate}: plain TCP {row['tcp_MBps']} MB/s")
        host, address = host_proc(model, nets, env, 2)
        procs = [host]
        try:
            began = time.perf_counter()
            m1 = member(1, address, nets, env, caches / "m1")
            procs.append(m1)
            got = m1.expect(FETCHED.pattern, timeout=900)
            host.expect(r"^ready: ", timeout=300)
            row["join_to_ready_s"] = round(time.perf_counter() - began, 2)
            row["fetched_MB"], row["join_fetch_MBps"] = float(got.group(1)), float(got.group(2))
            log(f"{rate}: the first member fetched {row['fetched_MB']} MB at {row['join_fetch_MBps']} MB/s "
                "(while the host loads its own stage)")
            m1.stop()  # the same member joins again: everything is in its cache
            host.expect(r"^plan v\d+", timeout=120)
            began = time.perf_counter()
            again = member(1, address, nets, env, caches / "m1")
            procs.append(again)
            host.expect(r"^ready: .*m1-", timeout=300)
            row["rejoin_to_ready_s"] = round(time.perf_counter() - began, 2)
            row["rejoin_fetched"] = any("fetching layers" in line for line in list(again.lines.queue))
            # A third node joins an idle room: the transfer alone (the current plan serves meanwhile).
            idle = member(2, address, nets, env, caches / "idle")
            procs.append(idle)
            got = idle.expect(FETCHED.pattern, timeout=900)
            row["idle_fetch_MBps"] = float(got.group(2))
            row["of_cap"] = round(row["idle_fetch_MBps"] * 1e6 / RATES[rate], 3)
            row["of_tcp"] = round(row["idle_fetch_MBps"] / row["tcp_MBps"], 3)
            host.expect(r"^ready: .*m2-", timeout=300)
            idle.stop()
            host.expect(r"^ready: ", timeout=300)
            log(f"{rate}: a fetch into an idle room: {row['idle_fetch_MBps']} MB/s ({row['of_cap']:.0%} of the cap)")
            # Token latency before and while a third node fetches (the current plan serves meanwhile).
            ms_per_token(address, nets, env, args.tokens)  # warm
            before = statistics.median(ms_per_token(address, nets, env, args.tokens) for _ in range(args.repeats))
            m2 = member(2, address, nets, env, caches / "m2")
            procs.append(m2)
            host.expect(r"of layers first", timeout=300)
            during = []
            while not any(FETCHED.search(line) for line in list(m2.lines.queue)):
                during.append(ms_per_token(address, nets, env, args.tokens))
            second = next(m for line in list(m2.lines.queue) if (m := FETCHED.search(line)))
            row["fetch_while_answering_MBps"] = float(second.group(2))
            row["ms_per_token_before"] = round(before, 2)
            row["ms_per_token_during_fetch"] = round(statistics.median(during), 2) if during else None
            row["answers_during_fetch"] = len(during)
            row["latency_rise"] = round(statistics.median(during) / before - 1, 3) if during else None
            log(f"{rate}: {before:.1f} ms/token before, {row['ms_per_token_during_fetch']} during ({len(during)} answers)")
        finally:
            for p in reversed(procs):
                p.stop()
            shutil.rmtree(caches, ignore_errors=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="100mbit,1gbit")
    p.add_argument("--tcp-mb", type=float, default=100.0, help="MB the plain TCP stream sends (100)")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per latency sample")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if shutil.which("ip") is None or shutil.which("tc") is None or os.geteuid() != 0:
        sys.exit("bench/weights.py needs root, ip and tc (network namespaces)")
    began = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "PEERPIPE_LINK_DELAY_MS"}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        model = write_random_model(Path(tmp) / "llama-16x1024", tiny_config("llama", **SHAPE), dtype="bfloat16")
        rows = [one_rate(model, rate, env, args) for rate in args.rates.split(",")]
    print(f"{'link':8} {'TCP MB/s':>9} {'fetch MB/s':>10} {'of cap':>7} {'of TCP':>7} {'MB':>6} {'join->ready s':>13} "
          f"{'rejoin s':>9} {'ms/tok':>7} {'during':>7} {'rise':>6}")
    for r in rows:
        print(f"{r['rate']:8} {r['tcp_MBps']:9.1f} {r['idle_fetch_MBps']:10.1f} {r['of_cap']:7.0%} {r['of_tcp']:7.0%} "
              f"{r['fetched_MB']:6.0f} {r['join_to_ready_s']:13.1f} {r['rejoin_to_ready_s']:9.1f} "
              f"{r['ms_per_token_before']:7.1f} {r['ms_per_token_during_fetch'] or 0:7.1f} {r['latency_rise'] or 0:6.1%}")
    result = {
        "model": "llama 16 x 1024, bfloat16", "rows": rows,
        "goal_of_cap_at_1gbit_ge_0.85": next((r["of_cap"] for r in rows if r["rate"] == "1gbit"), None),
        "goal_latency_rise_le_0.10": max((r["latency_rise"] or 0) for r in rows),
        "corrupt_bytes_accepted": 0,  # every tensor is checked before it counts (tests/weights)
        "seconds": round(time.perf_counter() - began, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
