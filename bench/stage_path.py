"""Where a room's decode step spends its time, layer by layer of the software: the local engine
(eager), a stage's forward and sampling called directly, the same on the compute thread, the
stage server behind its queue, and a whole room of one node (its local path), in one run.

    python bench/stage_path.py                                   # CPU, 75M deep-narrow shape
    python bench/stage_path.py --device cuda --shape llama-3.2-1b --dtype bfloat16

Each row decodes the same greedy tokens of one session. Prints a table of ms per token and ratios
to the eager engine, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from engine import SHAPES  # noqa: E402

from peerpipe.compute import run_compute  # noqa: E402
from peerpipe.devtools.tiny_model import tiny_config, write_random_model  # noqa: E402
from peerpipe.engine.generate import LocalEngine  # noqa: E402
from peerpipe.engine.sampling import Sampler, SamplingParams  # noqa: E402
from peerpipe.inference.wire import from_wire, to_wire  # noqa: E402

PROMPT = list(range(5, 37))


def engine_ms(engine: LocalEngine, n: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    engine.generate(PROMPT, params)
    best = min((r := engine.generate(PROMPT, params)).decode_s / (len(r.tokens) - 1) for _ in range(3))
    return best * 1e3


class DirectStage:
    """What StageServer._forward does for one session, without the server around it."""

    def __init__(self, engine: LocalEngine) -> None:
        self.stage, self.cache, self.sampler = engine.stage, engine.cache, Sampler()
        self.device = engine.cache.device

    @torch.inference_mode()
    def step(self, slot: int, wire_in) -> object:  # type: ignore[no-untyped-def]
        x = from_wire(wire_in, self.device).to(torch.long)
        batch = self.cache.batch([slot], x.shape[1])
        out = self.stage(x, self.cache, batch, last_only=True)
        token = self.sampler.sample(out[:, -1], [SamplingParams(temperature=0.0)], [None], [[]])
        return to_wire(torch.tensor([token.tolist()[0]], dtype=torch.long))

    def loop(self, n: int) -> float:
        """Every step on the calling thread, back to back."""
        best = float("inf")
        for _ in range(3):
            slot = self.cache.alloc()
            out = self.step(slot, to_wire(torch.tensor([PROMPT], dtype=torch.long)))
            began = time.perf_counter()
            for _ in range(n - 1):
                token = int(out.to_numpy().reshape(-1)[0])
                out = self.step(slot, to_wire(torch.tensor([[token]], dtype=torch.long)))
            best = min(best, (time.perf_counter() - began) / (n - 1))
            self.cache.free(slot)
        return best * 1e3

    def hops(self, n: int) -> float:
        """Each step sent from the event loop to the compute thread, as a stage server does."""

        async def main() -> float:
            best = float("inf")
            for _ in range(3):
                slot = self.cache.alloc()
                out = await run_compute(self.step, slot, to_wire(torch.tensor([PROMPT], dtype=torch.long)))
                began = time.perf_counter()
                for _ in range(n - 1):
                    token = int(out.to_numpy().reshape(-1)[0])
                    out = await run_compute(self.step, slot, to_wire(torch.tensor([[token]], dtype=torch.long)))
                best = min(best, (time.perf_counter() - began) / (n - 1))
                self.cache.free(slot)
            return best * 1e3

        return asyncio.run(main())


def room_ms(model: Path, args: argparse.Namespace, n: int) -> float:
    from peerpipe.python_api import create_room

    async def main() -> float:
        async with create_room(model, device=args.device, dtype=args.dtype, context=256, sessions=1, quick=True) as room:
            await room.plan()
            best = float("inf")
            for _ in range(4):
                r = await room.generate(PROMPT, temperature=0.0, max_tokens=n, ignore_eos=True)
                best = min(best, r.decode_s / (len(r.tokens) - 1))
            return best * 1e3

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu-75m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model = ROOT / ".bench" / f"stage-{args.shape}-{args.dtype}"
    if not (model / "config.json").is_file():
        write_random_model(model, tiny_config("llama", **SHAPES[args.shape]), seed=0, dtype=args.dtype)
    engine, _ = asyncio.run(
        run_compute(LocalEngine.from_dir, model, device=args.device, dtype=args.dtype, max_seq=256, cuda_graphs=False)
    )
    # All tensor work on the compute thread, as in a node (a second thread's pool would skew it).
    on_compute = lambda fn, *a: asyncio.run(run_compute(fn, *a))  # noqa: E731
    rows = {"engine, eager": on_compute(engine_ms, engine, args.tokens)}
    if args.device.startswith("cuda"):
        # On a GPU there is no CPU thread pool to skew; does the launching thread itself matter?
        rows["engine, eager, main thread"] = engine_ms(engine, args.tokens)
    direct = DirectStage(engine)
    rows["stage step, back to back"] = on_compute(direct.loop, args.tokens)
    rows["stage step, hop per token"] = direct.hops(args.tokens)
    del engine, direct
    rows["room of one (Python API)"] = room_ms(model, args, args.tokens)
    base = rows["engine, eager"]
    print(f"{'path':<28} {'ms/token':>9} {'x eager':>8}")
    for name, ms in rows.items():
        print(f"{name:<28} {ms:>9.3f} {ms / base:>8.2f}")
    print(json.dumps({"bench": "stage_path", "shape": args.shape, "device": args.device, "dtype": args.dtype,
                      "ms_per_token": {k: round(v, 4) for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
