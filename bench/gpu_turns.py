"""What three processes lose taking turns on one GPU, with no room code around them.

    python bench/gpu_turns.py      # needs a CUDA GPU

Three "stages" each replay a CUDA graph of a chain of products (three sizes: about 2 ms, 0.4 ms
and a few µs of GPU work a stage) and hand the next stage the turn through a flag in shared
memory (a spinning wait: no thread's wake-up is counted). Microseconds per round of all three:
one process replaying the three graphs back to back ("one"); three processes, each copying its
output to the host and waiting for it before handing over ("serial", as a room's stages did);
and three processes where each enqueues its graph behind the previous stage's through a CUDA IPC
event and only the last waits ("chained"). The gap between "serial" and "one" is what sharing the
GPU costs by itself; a room's stages lose more than that only through their own CPU work.
Prints a line per size, then one JSON line.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.multiprocessing as mp

ROUNDS = 300
STAGES = 3
SIZES = ((150, 4096), (30, 4096), (8, 2048))  # (products, width) per stage


def make(layers: int, width: int, seed: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    weights = [torch.randn(width, width, device="cuda", dtype=torch.bfloat16) / width**0.5 for _ in range(layers)]
    x = torch.randn(1, width, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)

    def step() -> None:
        h = x
        for w in weights:
            h = torch.nn.functional.linear(h, w)
        y.copy_(h)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph, x, y, weights  # the graph reads the weights: the caller keeps them alive


def spin(flag: Any, value: int) -> None:
    while flag.value != value:
        pass


def stage(me: int, mode: str, layers: int, width: int, flag: Any, out: Any, to_next: Any, from_prev: Any, ready: Any) -> None:
    graph, x, y, _weights = make(layers, width, me)
    host = torch.empty(y.shape, dtype=y.dtype).pin_memory()
    done = torch.cuda.Event(interprocess=True)
    if to_next is not None:
        to_next.put((y, done.ipc_handle()))
    prev_y, prev_done = None, None
    if from_prev is not None:
        prev_y, handle = from_prev.get()
        prev_done = torch.cuda.Event.from_ipc_handle(torch.cuda.current_device(), handle)
    ready.release()
    stream = torch.cuda.current_stream()
    began = 0.0
    for r in range(2 * ROUNDS):
        spin(flag, r * STAGES + me)
        if me == 0 and r == ROUNDS:
            began = time.perf_counter()
        if mode == "chained":
            if prev_done is not None:
                stream.wait_event(prev_done)
                x.copy_(prev_y)
            graph.replay()
            if me < STAGES - 1:
                done.record(stream)
            else:
                host.copy_(y, non_blocking=True)
                stream.synchronize()
        else:
            x.copy_(host, non_blocking=True)
            graph.replay()
            host.copy_(y, non_blocking=True)
            stream.synchronize()
        flag.value = r * STAGES + me + 1
    if me == 0:
        spin(flag, 2 * ROUNDS * STAGES)
        out.value = (time.perf_counter() - began) / ROUNDS * 1e6


def processes(mode: str, layers: int, width: int) -> float:
    ctx = mp.get_context("spawn")
    flag, out, ready = ctx.Value("q", -1, lock=False), ctx.Value("d", 0.0, lock=False), ctx.Semaphore(0)
    queues = [ctx.Queue() for _ in range(STAGES - 1)]
    procs = [
        ctx.Process(target=stage, args=(i, mode, layers, width, flag, out,
                                        queues[i] if i < STAGES - 1 else None, queues[i - 1] if i else None, ready))
        for i in range(STAGES)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    flag.value = 0
    for p in procs:
        p.join()
    return out.value


def one_process(layers: int, width: int) -> float:
    built = [make(layers, width, i) for i in range(STAGES)]
    host = torch.empty(1, width, dtype=torch.bfloat16).pin_memory()
    began = 0.0
    for r in range(2 * ROUNDS):
        if r == ROUNDS:
            began = time.perf_counter()
        for i, (graph, x, _, _) in enumerate(built):
            if i:
                x.copy_(built[i - 1][2])
            graph.replay()
        host.copy_(built[-1][2], non_blocking=True)
        torch.cuda.current_stream().synchronize()
    return (time.perf_counter() - began) / ROUNDS * 1e6


def main() -> None:
    rows = []
    for layers, width in SIZES:
        row: dict[str, float] = {"layers": layers, "width": width, "one": one_process(layers, width)}
        for mode in ("serial", "chained", "serial", "chained"):  # interleaved; the better of two
            row[mode] = min(row.get(mode, float("inf")), processes(mode, layers, width))
        torch.cuda.empty_cache()
        row["serial_vs_one"] = row["serial"] / row["one"]
        print(f"{layers} products of {width}: µs per round of {STAGES} stages: one process {row['one']:.0f}, "
              f"serial {row['serial']:.0f} ({row['serial_vs_one']:.2f}x), chained {row['chained']:.0f}", flush=True)
        rows.append(row)
    print(json.dumps({"bench": "gpu_turns", "device": torch.cuda.get_device_name(), "results": rows}))


if __name__ == "__main__":
    main()
