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
    """On CUDA: one decode step's matrix products of the 1B shape (a layer's four, and the head),
    bf16 cuBLAS against the int8 kernels (engine/int8_cuda.py: the Gluon ones it picks, and the
    plain Triton one), each replayed from a CUDA graph as a decode step runs them, by rows."""
    import torch
    import torch.nn.functional as F
    from kernels import timed

    from peerpipe.engine.int8_cuda import CONFIG, int8_gemv
    from peerpipe.engine.quant import quantize

    # Copies of each matrix (over 400 MB in bf16, several times the L2), visited in turn as a
    # decode step visits a model's layers, so neither side is timed from the cache.
    layer = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]  # q|k|v, o, gate|up, down
    out = []
    for part, shapes, copies in (("layer", layer, 8), ("head", [(128256, 2048)], 2)):
        mats = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in shapes * copies]
        quant = [quantize(w, "int8") for w in mats]
        for m in (1, 2, 4, 8):
            xs = [torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16) for w in mats]
            pairs = list(zip(xs, mats, quant, strict=True))
            bf16 = timed(lambda p=pairs: [F.linear(x, w) for x, w, _ in p]) / copies
            gluon = timed(lambda p=pairs: [int8_gemv(x, q.q, q.scale) for x, _, q in p]) / copies
            plain = timed(lambda p=pairs, m=m: [int8_gemv(x, q.q, q.scale, CONFIG[1 << (m - 1).bit_length()])
                                                for x, _, q in p]) / copies
            x0, _, q0 = pairs[0]
            want = F.linear(x0.float(), q0.dequantize(torch.float32))
            err = float((int8_gemv(x0, q0.q, q0.scale).float() - want).abs().max() / want.abs().max())
            nbytes = sum(q.q.numel() for q in quant) / copies
            out.append({"part": part, "rows": m, "bf16_ms": round(bf16, 4), "int8_ms": round(gluon, 4),
                        "plain_int8_ms": round(plain, 4), "speedup": round(bf16 / gluon, 2),
                        "int8_tb_s": round(nbytes / gluon / 1e9, 2), "rel_err": round(err, 5)})
            log(f"{part}, {m} rows: bf16 {bf16:.4f} ms, int8 {gluon:.4f} ms ({bf16 / gluon:.2f}x), "
                f"plain Triton {plain:.4f} ms, error {err:.1e}")
        del mats, quant
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
    p.add_argument("--kernels", action="store_true", help="on CUDA, first time the int8 kernels' matrix products")
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
        print(f"decode products of the 1B shape's {k['part']}, {k['rows']} rows: bf16 {k['bf16_ms']} ms, int8 "
              f"{k['int8_ms']} ms ({k['speedup']}x, {k['int8_tb_s']} TB/s; plain Triton {k['plain_int8_ms']} ms)")
    print(json.dumps({"device": args.device, "rows": rows, "kernels": kernels,
                      "seconds": round(time.perf_counter() - began, 1)}))


if __name__ == "__main__":
    main()
