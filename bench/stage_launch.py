"""What a GPU stage's decode step costs the CPU before and after its graph runs.

    python bench/stage_launch.py --shapes llama-3.2-1b,llama-3-8b      # needs a CUDA GPU

For a first stage (token ids in, hidden states out), a middle one (hidden states in and out) and
a last one (hidden states in, a sampled token out), each holding a third of the model, and for
one stage holding it all: microseconds per step of the graph's replay call alone (the CPU's
launch), of a replay waited for (launch and run), and of the stage server's whole forward
(input from the wire, the graph, output to the wire), each step waited for, as a room runs them:
the lean path (bytes through pinned memory), the same traced, and the tensor path it replaced.
Prints a line per shape and stage (its figures by name), then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from engine import SHAPES  # noqa: E402

from peerpipe.devtools.tiny_model import tiny_config  # noqa: E402
from peerpipe.engine import gpu_wait  # noqa: E402
from peerpipe.engine.config import ModelConfig  # noqa: E402
from peerpipe.engine.random_weights import random_stage  # noqa: E402
from peerpipe.inference.stage_server import StageServer  # noqa: E402
from peerpipe.inference.wire import encode_hidden, from_wire, to_wire  # noqa: E402
from peerpipe.protocol import ComputeRequest  # noqa: E402

STEPS = 200


async def _nowhere(node: str, message: object) -> None:
    return None


def now(step):  # type: ignore[no-untyped-def]
    """Run a stage's step coroutine that never waits (inline rows) without an event loop."""
    try:
        step.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the step waited for its rows")


def timed(fn, n: int = STEPS) -> float:  # type: ignore[no-untyped-def]
    """Median microseconds of ``fn()``."""
    times = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


def traced(fn) -> float:  # type: ignore[no-untyped-def]
    """``timed(fn)`` with the room's trace on (its marks, and a GPU stage's CUDA events)."""
    import tempfile

    from peerpipe.inference import trace

    with tempfile.TemporaryFile("w") as sink:
        trace._file, trace._lines[:] = sink, []
        try:
            return timed(fn)
        finally:
            trace._file = None


def split(forward, g) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """One forward's parts, medians in microseconds: the CPU until the graph is launched, the
    GPU from the forward's start to the graph's start and through the graph (CUDA events), and
    the CPU from the launch to the forward's end."""
    Event = torch.cuda.Event
    parts: dict[str, list[float]] = {"cpu to launch": [], "gpu to graph": [], "gpu graph": [], "cpu after launch": []}
    replay = g.graph.replay
    for _ in range(STEPS):
        first, before, after = Event(enable_timing=True), Event(enable_timing=True), Event(enable_timing=True)
        launched = []

        def timed_replay(before=before, after=after, launched=launched) -> None:  # type: ignore[no-untyped-def]
            before.record()
            replay()
            after.record()
            launched.append(time.perf_counter())

        g.graph.replay = timed_replay
        first.record()
        began = time.perf_counter()
        forward()
        ended = time.perf_counter()
        after.synchronize()
        parts["cpu to launch"].append((launched[0] - began) * 1e6)
        parts["gpu to graph"].append(first.elapsed_time(before) * 1e3)
        parts["gpu graph"].append(before.elapsed_time(after) * 1e3)
        parts["cpu after launch"].append((ended - launched[0]) * 1e6)
    g.graph.replay = replay
    return {name: statistics.median(values) for name, values in parts.items()}


@torch.inference_mode()
def anatomy(cfg, start: int, end: int, dtype: torch.dtype, profile_cpu: bool = False) -> dict[str, float]:  # type: ignore[no-untyped-def]
    dev = torch.device("cuda")
    stage = random_stage(cfg, start, end, seed=0, device=dev, dtype=dtype)
    cache = stage.new_cache(16, 1024)
    server = StageServer(stage, cache, label="bench", next_hop=None if stage.is_last else "next",
                         host_id="host", send=_nowhere, max_batch=16)
    server.warm()
    if stage.is_first:
        wire_in = to_wire(torch.tensor([[7]], dtype=torch.long))
    else:
        wire_in = encode_hidden(torch.randn(1, 1, cfg.hidden_size, device=dev, dtype=dtype), "")[0]
    request = ComputeRequest("t", wire_in, "s", 1, 0, None, layer=start)
    server._admit(request)  # opens the session at position 0
    slot = server.sessions["t"].slot
    cache.lengths[slot] = 100
    graphed = server._graphed
    assert graphed is not None

    def forward() -> None:
        cache.lengths[slot] = 100
        now(server._gpu_forward([ComputeRequest("t", wire_in, "s", 1, 100, None, layer=start)]))

    for i in range(1, 16):
        server._admit(ComputeRequest(f"t{i}", wire_in, "s", 1, 0, None, layer=start))
    sixteen = ["t", *(f"t{i}" for i in range(1, 16))]

    def forward16() -> None:
        for task in sixteen:
            cache.lengths[server.sessions[task].slot] = 100
        now(server._gpu_forward([ComputeRequest(task, wire_in, "s", 1, 100, None, layer=start) for task in sixteen]))

    def batch():  # type: ignore[no-untyped-def]
        cache.lengths[slot] = 100
        return cache.batch([slot], 1)

    def x_in() -> torch.Tensor:
        x = from_wire(wire_in, torch.device("cpu")).to(dev, non_blocking=True)
        return x if stage.is_first else x.to(dtype)

    forward()
    x, b = x_in(), batch()
    graphed(x, b)
    g = next(g for k, g in graphed._graphs.items() if k[0] == (slot,) and k[1] == 128)
    sync = torch.cuda.synchronize
    out = {
        "input to device": timed(x_in),
        "cache batch": timed(batch),
        "graphed call": timed(lambda: graphed(x, b)),
        "replay call": timed(g.graph.replay),
        "replay waited": timed(lambda: (g.graph.replay(), sync())),
        "forward": timed(forward),
        "forward, traced": traced(forward),
    }
    out.update(split(forward, g))
    forward16()
    out["forward, 16 answers"] = timed(forward16)
    gpu_wait.SPIN = False
    out["forward, waits asleep"] = timed(forward)
    gpu_wait.SPIN = True
    server._lean = lambda data: False  # type: ignore[method-assign]
    out["forward, tensor path"] = timed(forward)
    out["forward, 16 answers, tensor path"] = timed(forward16)
    del server._lean
    sync()
    if profile_cpu:
        import cProfile
        import pstats

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(50):
                forward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        python = cProfile.Profile()
        python.runcall(lambda: [forward() for _ in range(200)])
        pstats.Stats(python).sort_stats("tottime").print_stats(25)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-3.2-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--profile", action="store_true", help="also print where the forward's CPU time goes")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    results = {}
    for shape in args.shapes.split(","):
        cfg = ModelConfig.from_hf(tiny_config("llama", **SHAPES[shape]))
        results[shape] = {}
        n = SHAPES[shape]["num_hidden_layers"]
        third = n // 3
        for name, (a, b) in {"whole": (0, n), "first third": (0, third), "middle third": (third, 2 * third),
                             "last third": (2 * third, n)}.items():
            results[shape][name] = anatomy(cfg, a, b, dtype, args.profile)
            gc.collect()
            torch.cuda.empty_cache()
            print(shape, name, {k: round(v, 1) for k, v in results[shape][name].items()}, flush=True)
    print(json.dumps({"bench": "stage_launch", "results": results}))


if __name__ == "__main__":
    main()
