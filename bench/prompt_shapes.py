"""What a prompt shape costs a CUDA stage the first time it meets it and the next time, with
PyTorch's cuDNN attention (the competitor: what stages ran before) and without it (the default:
``Stage.new_cache`` turns it off, engine/model.py expands grouped heads for memory-efficient
attention), in one run; also one eager decode step.

    python bench/prompt_shapes.py                      # llama-3-8b shape, its first 16 layers, bf16

A server meets a new prompt length, or a new count of prompts batched together, with nearly
every request: the first-time column is what a user waits for. Each variant runs in a process
of its own (the cuDNN plans and the allocator's pools start empty). Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES_MET = [(1, 512), (5, 32), (11, 32), (16, 32), (3, 100), (2, 2000), (1, 4000)]  # (prompts, tokens)


def measure(model: Path, layers: int, cudnn: bool) -> dict:
    """In this process: each shape twice, then eager decode steps; milliseconds."""
    import torch

    from peerpipe.engine.loader import load_stage

    stage, _ = load_stage(model, 0, layers, device="cuda", dtype="bfloat16")
    cache = stage.new_cache(16, 4200)
    torch.backends.cuda.enable_cudnn_sdp(cudnn)  # (new_cache turned it off)
    slots = [cache.alloc() for _ in range(16)]

    def forward(prompts: int, tokens: int, keep: bool = False) -> float:
        if not keep:
            for slot in slots[:prompts]:
                cache.lengths[slot] = 0
        ids = torch.randint(0, 1000, (prompts, tokens), device="cuda")
        torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.inference_mode():
            stage(ids, cache, cache.batch(slots[:prompts], tokens), last_only=True)
        torch.cuda.synchronize()
        return (time.perf_counter() - began) * 1e3

    forward(1, 8), forward(1, 8)  # CUDA, cuBLAS and the allocator started
    rows = {f"{p}x{t}": (forward(p, t), forward(p, t)) for p, t in SHAPES_MET}
    forward(1, 500)
    steps = sorted(forward(1, 1, keep=True) for _ in range(31))
    return {"shapes_ms": rows, "decode_first_ms": steps[-1], "decode_median_ms": steps[15]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--variant", choices=["cudnn", "default"], help=argparse.SUPPRESS)  # a child's
    args = parser.parse_args()
    model = ROOT / ".bench" / f"shapes-{args.shape}"
    if args.variant:
        print(json.dumps(measure(model, args.layers, args.variant == "cudnn")))
        return
    from engine import SHAPES

    from peerpipe.devtools.tiny_model import tiny_config, write_random_model

    if not (model / "config.json").is_file():
        write_random_model(model, tiny_config("llama", **SHAPES[args.shape]), seed=0, dtype="bfloat16", on_device=True)
    results = {}
    for variant in ("cudnn", "default"):
        print(f"[bench] {variant}: {args.layers} layers of {args.shape}", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--shape", args.shape, "--layers", str(args.layers), "--variant", variant],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'prompts x tokens':>16} {'cuDNN first':>12} {'again':>8} {'default first':>14} {'again':>8}  ms")
    for name in results["cudnn"]["shapes_ms"]:
        (c1, c2), (d1, d2) = results["cudnn"]["shapes_ms"][name], results["default"]["shapes_ms"][name]
        print(f"{name:>16} {c1:>12.1f} {c2:>8.1f} {d1:>14.1f} {d2:>8.1f}")
    for key in ("decode_first_ms", "decode_median_ms"):
        print(f"{key:>16} {results['cudnn'][key]:>12.2f} {'':>8} {results['default'][key]:>14.2f}")
    print(json.dumps({"bench": "prompt_shapes", "shape": args.shape, "layers": args.layers, **results}))


if __name__ == "__main__":
    main()
