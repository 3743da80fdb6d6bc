"""Weights in int8 and int4 against the model's dtype, side by side in one run: decode speed.

    python bench/quantize.py                                   # CPU: the bundled model, cpu-75m
    python bench/quantize.py --device cuda --shapes llama-3.2-1b --dtypes bfloat16

The local engine decodes 64 tokens after a 32-token prompt with each precision (the model's
dtype, int8 per output channel, int4 in groups of 64: engine/quant.py), median of 3. On CUDA
each runs with CUDA graphs, and with ``--compile`` also through torch.compile (which fuses the
int8 dequantization into the product). Ratios are against the unquantized run of the same dtype.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine import SHAPES  # noqa: E402

from peerpipe.devtools.tiny_model import tiny_config, write_random_model  # noqa: E402
from peerpipe.engine.generate import LocalEngine  # noqa: E402
from peerpipe.engine.loader import load_stage  # noqa: E402
from peerpipe.engine.sampling import SamplingParams  # noqa: E402
from peerpipe.engine.tokenizer import Tokenizer  # noqa: E402
from peerpipe.models import default_model_dir  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def tok_s(model: Path, dtype: str, mode: str, args: argparse.Namespace, compile_layers: bool) -> float:
    import torch

    torch._dynamo.reset()  # each precision compiles afresh, not as a recompile of the last
    stage, _ = load_stage(model, device=args.device, dtype=dtype, quantize=mode)
    engine = LocalEngine(stage, Tokenizer.from_dir(model), max_seq=128, compile_layers=compile_layers)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    prompt = [10 + i % 200 for i in range(32)]
    engine.generate(prompt, params)
    return statistics.median(engine.generate(prompt, params).tok_s for _ in range(args.repeats))


def kernel_table() -> list[dict]:
    """On CUDA: one decode step's matrix products of the 1B shape, bf16 cuBLAS against the int8
    kernel (engine/int8_cuda.py) in each tried configuration, by rows; the best config per row count."""
    import torch
    import torch.nn.functional as F

    from peerpipe.engine.int8_cuda import int8_gemv
    from peerpipe.engine.quant import quantize

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 50

    # Four copies of the four matrices (240 MB in bf16, several times the L2), visited in turn as a
    # decode step visits a model's layers, so neither side is timed from the cache.
    shapes = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)] * 4  # q|k|v, o, gate|up, down
    mats = [(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02) for n, k in shapes]
    quant = [quantize(w, "int8") for w in mats]
    configs = [(bn, bk, wp) for bn in (1, 2, 4, 8) for bk in (512, 1024, 2048) for wp in (4, 8)]
    out = []
    for m in (1, 2, 4, 8):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]

        def dense(xs: list = xs) -> None:  # type: ignore[type-arg]
            for x, w in zip(xs, mats, strict=True):
                F.linear(x, w)

        bf16 = timed(dense) / 4
        best = None
        for cfg in configs:
            def int8(c: tuple[int, int, int] = cfg, xs: list = xs) -> None:  # type: ignore[type-arg]
                for x, q in zip(xs, quant, strict=True):
                    int8_gemv(x, q.q, q.scale, c)

            try:
                ms = timed(int8) / 4
            except Exception as exc:  # a config the compiler refuses (too many registers)
                log(f"config {cfg}: {type(exc).__name__}")
                continue
            if best is None or ms < best[1]:
                best = (cfg, ms)
        assert best is not None
        x0, q0 = xs[0], quant[0]
        err = float((int8_gemv(x0, q0.q, q0.scale, best[0]).float() - F.linear(x0, q0.dequantize(torch.bfloat16)).float()).abs().max())
        out.append({"rows": m, "bf16_ms": round(bf16, 4), "int8_ms": round(best[1], 4), "speedup": round(bf16 / best[1], 2),
                    "config": best[0], "max_err": err})
        log(f"{m} rows: bf16 {bf16:.4f} ms, int8 {best[1]:.4f} ms with {best[0]} ({bf16 / best[1]:.2f}x), err {err:.2e}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--shapes", default="austen,cpu-75m", help="'austen' (the bundled model) or shapes of bench/engine.py")
    p.add_argument("--modes", default="none,int8,int4")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="on CUDA, also run with torch.compile")
    p.add_argument("--kernels", action="store_true", help="on CUDA, first time the int8 kernel's configurations")
    args = p.parse_args()
    began = time.perf_counter()
    kernels = kernel_table() if args.kernels else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            if shape == "austen":
                model = default_model_dir()
            else:
                model = write_random_model(Path(tmp) / shape, tiny_config("llama", **SHAPES[shape]), seed=0,
                                           dtype="bfloat16", shards=4 if shape == "llama-3.2-1b" else 1)
            for dtype in args.dtypes.split(","):
                for compiled in (False, True) if args.compile and args.device.startswith("cuda") else (False,):
                    base = None
                    for mode in args.modes.split(","):
                        speed = tok_s(model, dtype, mode, args, compiled)
                        base = base or speed
                        rows.append({"shape": shape, "dtype": dtype, "compile": compiled, "weights": mode,
                                     "tok_s": round(speed, 2), "ratio": round(speed / base, 3)})
                        log(f"{shape} {dtype}{' compiled' if compiled else ''} {mode}: {speed:.1f} tok/s ({speed / base:.2f}x)")
    print(f"{'shape':14} {'dtype':9} {'compile':7} {'weights':7} {'tok/s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['shape']:14} {r['dtype']:9} {r['compile']!s:7} {r['weights']:7} {r['tok_s']:9.2f} {r['ratio']:6.2f}")
    for k in kernels:
        print(f"decode matmuls of the 1B shape, {k['rows']} rows: bf16 {k['bf16_ms']} ms, int8 kernel {k['int8_ms']} ms "
              f"({k['speedup']}x, config {k['config']})")
    print(json.dumps({"device": args.device, "rows": rows, "kernels": kernels,
                      "seconds": round(time.perf_counter() - began, 1)}))


if __name__ == "__main__":
    main()
