"""What it costs two processes to take turns on one GPU (stages of a room on one GPU do).

    python bench/gpu_share.py      # needs a CUDA GPU

Two halves of a step each copy a small tensor in, replay a CUDA graph of a few products and copy
the result out, then hand over to the other half through a flag in shared memory (a spinning
wait, so no wake-up of a sleeping thread is counted). Per round of both halves, in microseconds:
both halves in one process one after the other, in two threads of one process, and in two
processes. What two processes add over one is what the GPU's switches between their contexts
cost (twice a round). Also the median time a half takes from its turn to its graph's launch
(the copy in and the replay call, which return at once unless the driver holds them). Prints a
line per shape, then one JSON line.
"""
import json
import multiprocessing as mp
import statistics
import threading
import time
from typing import Any

import torch

ROUNDS = 300


def make(layers: int, width: int, dev: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ws = [torch.randn(width, width, device=dev, dtype=torch.bfloat16) / width**0.5 for _ in range(layers)]
    x = torch.randn(1, width, device=dev, dtype=torch.bfloat16)

    def step() -> None:
        y = x
        for w in ws:
            y = torch.nn.functional.linear(y, w)
        x.copy_(y)

    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    g.weights = ws  # type: ignore[attr-defined]  # the graph reads them: freed, their memory could be reused
    host = torch.empty(1, width, dtype=torch.bfloat16, pin_memory=True)
    return g, x, host


def worker(me: int, flag: Any, layers: int, width: int, out: Any, ready: Any, launch: Any, built: Any = None) -> None:
    g, x, host = built if built is not None else make(layers, width, "cuda")
    ready.release()
    launches = []
    for r in range(ROUNDS * 2):
        turn = r * 2 + me
        while flag.value != turn:
            time.sleep(0)
        seen = time.perf_counter()
        x.copy_(host, non_blocking=True)
        g.replay()
        launches.append(time.perf_counter() - seen)
        host.copy_(x, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        if me == 0 and r == ROUNDS:
            out.value = time.perf_counter()
        flag.value = turn + 1
    if me == 0:
        out.value = time.perf_counter() - out.value
        launch.value = statistics.median(launches[ROUNDS:]) * 1e6


def procs(layers: int, width: int) -> float:
    ctx = mp.get_context("spawn")
    flag = ctx.Value("q", -1, lock=False)
    out = ctx.Value("d", 0.0, lock=False)
    launch = ctx.Value("d", 0.0, lock=False)
    ready = ctx.Semaphore(0)
    halves = [ctx.Process(target=worker, args=(i, flag, layers, width, out, ready, launch)) for i in range(2)]
    return race(halves, flag, out, ready), launch.value


def race(halves: list[Any], flag: Any, out: Any, ready: Any) -> float:
    """Start both halves, let them go once both are ready; µs per round."""
    for half in halves:
        half.start()
    for _ in range(2):
        ready.acquire()
    flag.value = 0
    for half in halves:
        half.join()
    return out.value / ROUNDS * 1e6


class Box:
    """What a shared-memory value is to the processes, for threads."""

    def __init__(self, value: Any) -> None:
        self.value = value


def threads(layers: int, width: int) -> tuple[float, float]:
    flag, out, ready, launch = Box(-1), Box(0.0), threading.Semaphore(0), Box(0.0)
    # Captured here, one after the other: two threads capturing at once is an error.
    built = [make(layers, width, "cuda") for _ in range(2)]
    halves = [threading.Thread(target=worker, args=(i, flag, layers, width, out, ready, launch, built[i])) for i in range(2)]
    return race(halves, flag, out, ready), launch.value


def one(layers: int, width: int) -> tuple[float, float]:
    a = make(layers, width, "cuda")
    b = make(layers, width, "cuda")
    launches = []
    for r in range(ROUNDS * 2):
        if r == ROUNDS:
            t0 = time.perf_counter()
        for g, x, host in (a, b):
            seen = time.perf_counter()
            x.copy_(host, non_blocking=True)
            g.replay()
            launches.append(time.perf_counter() - seen)
            host.copy_(x, non_blocking=True)
            torch.cuda.current_stream().synchronize()
    return (time.perf_counter() - t0) / ROUNDS * 1e6, statistics.median(launches[2 * ROUNDS :]) * 1e6


if __name__ == "__main__":
    results = []
    for layers, width in ((1, 256), (8, 2048)):
        timed = {"one": one(layers, width), "threads": threads(layers, width), "procs": procs(layers, width),
                 "one2": one(layers, width), "procs2": procs(layers, width)}
        res = {name: round_us for name, (round_us, _) in timed.items()}
        launch = {f"{name}_launch": launch_us for name, (_, launch_us) in timed.items()}
        row = {"layers": layers, "width": width, **res, **launch}
        row["switch_us"] = (min(res["procs"], res["procs2"]) - min(res["one"], res["one2"])) / 2
        results.append(row)
        print(f"layers={layers} width={width} us per round (two halves): " + " ".join(f"{k}={v:.0f}" for k, v in res.items())
              + "; a half's copy in and launch: " + " ".join(f"{k}={v:.0f}" for k, v in launch.items()), flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "results": results}))
