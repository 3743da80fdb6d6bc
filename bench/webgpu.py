"""WebGPU stages against torch on the same device, side by side in one run.

    python bench/webgpu.py                                   # CPU: lavapipe vs torch CPU (correctness only)
    python bench/webgpu.py --torch-device cuda --shape llama-3.2-1b --torch-dtype bfloat16

Three figures, each WebGPU (wgpu, the package's WGSL kernels) against torch on the same machine:
the seed's 1024 x 1024 f32 matmul (TFLOPS), one decoder layer's decode step (the benchmark the
planner uses, layers timed in a stack), and greedy decode tok/s of the whole model from a
random checkpoint (torch eager; with CUDA graphs too, for reference), with how many tokens the
two engines agree on. WebGPU holds its matrices in f16 where the adapter has shader-f16, and
computes in f32. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine import SHAPES, ensure_model  # noqa: E402

from peerpipe.cluster.benchmark import bench_layer  # noqa: E402
from peerpipe.engine.config import ModelConfig  # noqa: E402
from peerpipe.engine.generate import LocalEngine  # noqa: E402
from peerpipe.engine.loader import load_stage  # noqa: E402
from peerpipe.engine.sampling import SamplingParams  # noqa: E402
from peerpipe.engine.tokenizer import Tokenizer  # noqa: E402
from peerpipe.models import resolve_model  # noqa: E402
from peerpipe.webgpu.bench import matmul_tflops  # noqa: E402
from peerpipe.webgpu.load import load_webgpu_stage, local_executor  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def torch_matmul_tflops(device: torch.device, n: int = 1024) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 200 if device.type == "cuda" else 5
    began = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - began) / 1e12


def decode(engine: LocalEngine, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm
    result = engine.generate(prompt, params)
    return result.tok_s, list(result.tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="austen", help=f"austen (the bundled model) or one of {', '.join(SHAPES)}")
    parser.add_argument("--torch-device", default="cpu")
    parser.add_argument("--torch-dtype", default="float32")
    parser.add_argument("--webgpu-dtype", default=None, help="float16 (f16 storage where supported) or float32")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--models", type=Path, default=Path("/tmp/peerpipe-bench-models"))
    args = parser.parse_args()

    path = resolve_model("austen") if args.shape == "austen" else ensure_model(args.shape, "bfloat16", args.models)
    cfg = ModelConfig.from_dir(path)
    device = torch.device(args.torch_device)
    gpu = local_executor()
    wdtype = args.webgpu_dtype or ("float16" if gpu.has_f16 else "float32")
    log(f"WebGPU adapter: {gpu.name}; torch device: {device}")
    rows: list[tuple[str, float, float, str]] = []

    log("1024 x 1024 f32 matmul")
    rows.append(("matmul 1024² f32 (TFLOPS)", matmul_tflops(1024, gpu=gpu), torch_matmul_tflops(device), "higher"))

    log("one layer's decode step")
    wl = bench_layer(cfg, "webgpu", wdtype)  # the same stacks, through the WGSL stage
    tl = bench_layer(cfg, str(device), args.torch_dtype)
    rows.append(("layer decode (ms)", wl.decode_ms, tl.decode_ms, "lower"))
    rows.append(("layer prefill 128 (ms)", wl.prefill_ms, tl.prefill_ms, "lower"))

    log("whole-model greedy decode")
    tokenizer = Tokenizer.from_dir(path)
    prompt = tokenizer.encode("It is a truth universally acknowledged, that a single man in possession of a good fortune")
    seq = len(prompt) + args.tokens + 8
    wstage, _ = load_webgpu_stage(path, dtype=wdtype)
    w_tok_s, w_tokens = decode(LocalEngine(wstage, tokenizer, max_seq=seq), prompt, args.tokens)
    del wstage
    tstage, _ = load_stage(path, device=str(device), dtype=args.torch_dtype)
    t_tok_s, t_tokens = decode(LocalEngine(tstage, tokenizer, max_seq=seq, cuda_graphs=False), prompt, args.tokens)
    graphs = None
    if device.type == "cuda":
        graphs, _ = decode(LocalEngine(tstage, tokenizer, max_seq=seq, cuda_graphs=True), prompt, args.tokens)
    rows.append(("decode (tok/s)", w_tok_s, t_tok_s, "higher"))
    agree = next((i for i, (a, b) in enumerate(zip(w_tokens, t_tokens, strict=True)) if a != b), len(w_tokens))

    print(f"\n{args.shape}: WebGPU ({gpu.name}, {wdtype} weights) vs torch {device} eager ({args.torch_dtype})")
    print(f"{'':28} {'WebGPU':>10} {'torch':>10} {'WebGPU/torch':>13}")
    for name, w, t, better in rows:
        ratio = (w / t) if better == "higher" else (t / w)
        print(f"{name:28} {w:10.4g} {t:10.4g} {ratio:12.2f}x")
    if graphs is not None:
        print(f"torch with CUDA graphs: {graphs:.1f} tok/s (WebGPU {w_tok_s / graphs:.2f}x of it)")
    print(f"greedy tokens equal for the first {agree} of {len(w_tokens)}")
    print(json.dumps({
        "bench": "webgpu", "shape": args.shape, "adapter": gpu.name, "torch_device": str(device),
        "webgpu_dtype": wdtype, "torch_dtype": args.torch_dtype,
        "matmul_tflops": {"webgpu": rows[0][1], "torch": rows[0][2]},
        "layer_decode_ms": {"webgpu": wl.decode_ms, "torch": tl.decode_ms},
        "decode_tok_s": {"webgpu": w_tok_s, "torch_eager": t_tok_s, "torch_graphs": graphs},
        "decode_ratio_to_eager": w_tok_s / t_tok_s, "greedy_agree": agree, "tokens": len(w_tokens),
    }))


if __name__ == "__main__":
    main()
