"""Decode speed of peerpipe's engine against transformers, side by side in one run.

    python bench/engine.py                       # CPU: ~90M-parameter Llama shape, fp32, 2 threads
    python bench/engine.py --device cuda --shape llama-3.2-1b --dtype bfloat16

Both engines load the same random checkpoint, get the same prompt, and decode the same number of
tokens greedily. Decode tok/s excludes the prompt: for transformers it is
(N-1) / (time(N new tokens) - time(1 new token)); for peerpipe the engine times its own loop.
The bound column is the memory-bandwidth limit: measured bandwidth / bytes read per token.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peerpipe.devtools.tiny_model import param_count, tiny_config, write_random_model  # noqa: E402
from peerpipe.engine import attention_cuda, bf16_gluon, normed  # noqa: E402
from peerpipe.engine.generate import LocalEngine  # noqa: E402
from peerpipe.engine.loader import load_stage  # noqa: E402
from peerpipe.engine.sampling import SamplingParams  # noqa: E402
from peerpipe.engine.tokenizer import Tokenizer  # noqa: E402

# Two ~75-90M CPU shapes (deep-narrow like the small "mobile" Llamas; the 75M one is the shape at
# which transformers reaches the ~36 tok/s the engine issue quotes) and Llama 3.2 1B.
SHAPES = {
    "cpu-75m": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=40,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=32000,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
    "cpu-90m": dict(
        hidden_size=512,
        intermediate_size=1280,
        num_hidden_layers=28,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
    # Wide and shallow, as a new user's first small model often is (GPT-2 small's proportions):
    # fewer, larger products, so per-operation overhead matters less than on the deep-narrow shapes.
    "cpu-wide": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    # A real size, drawn on the device from a seed (engine/random_weights.py): no checkpoint on
    # disk, so transformers (which needs one) is left out for it.
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}
DRAWN = {"llama-3-8b"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def ensure_model(shape: str, dtype: str, root: Path) -> Path:
    path = root / f"{shape}-{dtype}"
    if not (path / "config.json").is_file():
        drawn = shape in DRAWN
        log(f"writing random {shape} {'folder (weights drawn on the device)' if drawn else 'checkpoint'} to {path}")
        cfg = tiny_config("llama", **SHAPES[shape])
        write_random_model(path, cfg, seed=0, dtype=dtype, shards=4 if shape == "llama-3.2-1b" else 1, on_device=drawn)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth_gbs(device: torch.device, dtype: torch.dtype) -> float:
    """Bytes matrix-vector products stream per second from memory: the ceiling for decode.

    The matrices add up to 1 GiB, far more than any cache, and are visited in turn, as a decode
    step visits a model's weights."""
    n_mats, rows, cols = (4, 16384, 8192) if device.type == "cuda" else (8, 8192, 4096)
    mats = [torch.randn(rows, cols, device=device, dtype=dtype) for _ in range(n_mats)]
    x = torch.randn(1, cols, device=device, dtype=dtype)
    for w in mats:
        torch.nn.functional.linear(x, w)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        for w in mats:
            torch.nn.functional.linear(x, w)
    sync(device)
    total = sum(w.numel() * w.element_size() for w in mats) * reps
    return total / (time.perf_counter() - t) / 1e9


@dataclass
class Run:
    tok_s: float
    ttft_ms: float
    tokens: list[int]


def _own_kernels(on: bool) -> None:
    bf16_gluon.enabled = attention_cuda.enabled = normed.enabled = on


class PeerpipeRunner:
    def __init__(
        self, path: Path, args: argparse.Namespace, graphs: bool, compile_layers: bool = False, gluon: bool = True
    ) -> None:
        # gluon=False: torch's kernels (cuBLAS, SDPA, separate norms) instead of ours (engine/bf16_gluon.py,
        # engine/attention_cuda.py); graphs and compiled layers keep what they were captured
        # with, and run() sets it again for any captured later.
        self.gluon = gluon
        _own_kernels(gluon)
        stage, _ = load_stage(path, device=args.device, dtype=args.dtype)
        self.engine = LocalEngine(
            stage,
            Tokenizer.from_dir(path),
            max_seq=args.prompt_len + args.new_tokens + 1,
            cuda_graphs=graphs,
            compile_layers=compile_layers,
        )
        self.prompt = list(range(10, 10 + args.prompt_len))
        self.params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        self.run()  # warm-up: allocator, kernels, graph capture, compilation

    def run(self) -> Run:
        _own_kernels(self.gluon)
        r = self.engine.generate(self.prompt, self.params)
        _own_kernels(True)
        return Run(r.tok_s, r.prefill_s * 1000, r.tokens)


class TransformersRunner:
    def __init__(self, path: Path, args: argparse.Namespace, attn: str) -> None:
        from transformers import AutoModelForCausalLM

        self.device = torch.device(args.device)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype], attn_implementation=attn)
        self.model = model.to(self.device).eval()
        self.ids = torch.arange(10, 10 + args.prompt_len, device=self.device)[None]
        self.new_tokens = args.new_tokens
        self._generate(4)

    def _generate(self, n: int) -> tuple[float, list[int]]:
        sync(self.device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                self.ids,
                attention_mask=torch.ones_like(self.ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        sync(self.device)
        return time.perf_counter() - t, out[0, self.ids.shape[1] :].tolist()

    def run(self) -> Run:
        first, _ = self._generate(1)
        full, tokens = self._generate(self.new_tokens)
        return Run((self.new_tokens - 1) / (full - first), first * 1000, tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both engines")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", type=Path, default=ROOT / ".bench", help="where random checkpoints are kept")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time CUDA graphs over torch.compile'd layers")
    p.add_argument("--cublas", action="store_true",
                   help="also time the graphed runs with torch's kernels for products and attention (cuBLAS, SDPA)")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.shape = args.shape or ("llama-3.2-1b" if gpu else "cpu-75m")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.prompt_len = args.prompt_len or (128 if gpu else 32)
    args.new_tokens = args.new_tokens or (128 if gpu else 64)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    path = ensure_model(args.shape, args.dtype, args.models)
    cfg = tiny_config("llama", **SHAPES[args.shape])
    n_params = param_count(cfg)
    itemsize = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    # Per token: every weight once (the tied embedding is read as the LM head), plus the KV cache.
    kv_bytes = (
        2
        * cfg["num_hidden_layers"]
        * cfg["num_key_value_heads"]
        * (cfg["hidden_size"] // cfg["num_attention_heads"])
    )
    bytes_per_token = n_params * itemsize + kv_bytes * itemsize * (args.prompt_len + args.new_tokens // 2)
    log("measuring memory bandwidth")
    bw = bandwidth_gbs(device, DTYPES[args.dtype])
    bound = bw * 1e9 / bytes_per_token

    runners: list[tuple[str, PeerpipeRunner | TransformersRunner]] = []
    if gpu and args.compile:
        log("peerpipe, CUDA graphs over torch.compile'd layers (compiling...)")
        runners.append(
            ("peerpipe (graphs+compile)", PeerpipeRunner(path, args, graphs=True, compile_layers=True))
        )
        if args.cublas:
            runners.append(("compile, torch's kernels", PeerpipeRunner(path, args, True, True, gluon=False)))
    if gpu:
        log("peerpipe, CUDA graphs")
        runners.append(("peerpipe (CUDA graphs)", PeerpipeRunner(path, args, graphs=True)))
        if args.cublas:
            runners.append(("graphs, torch's kernels", PeerpipeRunner(path, args, graphs=True, gluon=False)))
        log("peerpipe, eager")
        runners.append(("peerpipe (eager)", PeerpipeRunner(path, args, graphs=False)))
    else:
        log("peerpipe")
        runners.append(("peerpipe", PeerpipeRunner(path, args, graphs=False)))
    if not args.skip_transformers and args.shape not in DRAWN:
        for attn in ("eager", "sdpa") if gpu else ("sdpa",):
            log(f"transformers generate ({attn})")
            runners.append((f"transformers ({attn})", TransformersRunner(path, args, attn)))

    # Interleave the engines' runs so a noisy moment on a shared machine hits all of them.
    runs: dict[str, list[Run]] = {name: [] for name, _ in runners}
    for i in range(args.repeats):
        log(f"round {i + 1} of {args.repeats}")
        for name, runner in runners:
            runs[name].append(runner.run())
    rows = [
        (
            name,
            {
                "tok_s": statistics.median(r.tok_s for r in rs),
                "ttft_ms": statistics.median(r.ttft_ms for r in rs),
                "tokens": rs[0].tokens,
            },
        )
        for name, rs in runs.items()
    ]
    reference = next((name for name, _ in rows if name.startswith("transformers")), None)
    base = dict(rows)[reference]["tok_s"] if reference else None  # eager on a GPU, sdpa on a CPU
    # The speed-up is the median over rounds of each round's ratio, the steadiest figure here.
    speedup = (
        statistics.median(a.tok_s / b.tok_s for a, b in zip(runs[rows[0][0]], runs[reference], strict=True))
        if reference
        else None
    )
    print(f"\nmodel {args.shape}: {n_params / 1e6:.1f}M params, {args.dtype}, device {args.device}", end="")
    print(f", threads {args.threads}" if not gpu else "")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"bandwidth {bw:.1f} GB/s -> bound {bound:.0f} tok/s\n")
    print(f"{'engine':<26}{'decode tok/s':>14}{'x transformers':>16}{'% of bound':>12}{'TTFT ms':>10}")
    for name, r in rows:
        ratio = f"{r['tok_s'] / base:.2f}" if base else "-"
        print(
            f"{name:<26}{r['tok_s']:>14.1f}{ratio:>16}{100 * r['tok_s'] / bound:>11.0f}%{r['ttft_ms']:>10.1f}"
        )
    same = len({tuple(r["tokens"]) for _, r in rows}) == 1
    ref_tokens = rows[0][1]["tokens"]
    for name, r in rows[1:]:
        agree = next(
            (i for i, (a, b) in enumerate(zip(ref_tokens, r["tokens"], strict=False)) if a != b),
            len(ref_tokens),
        )
        print(f"{name}: same greedy tokens as {rows[0][0]} for the first {agree} of {len(ref_tokens)}")
    print(f"greedy tokens identical across engines: {same}")
    summary = {
        "bench": "engine",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if gpu else "cpu",
        "shape": args.shape,
        "params_m": round(n_params / 1e6, 1),
        "dtype": args.dtype,
        "threads": args.threads,
        "bandwidth_gbs": round(bw, 1),
        "bound_tok_s": round(bound, 1),
        "tokens_identical": same,
        "engines": {
            name: {"tok_s": round(r["tok_s"], 2), "ttft_ms": round(r["ttft_ms"], 2)} for name, r in rows
        },
    }
    if speedup is not None:
        summary["speedup_vs_transformers"] = round(speedup, 3)
        print(f"{rows[0][0]} over {reference}: {speedup:.2f}x (median of per-round ratios)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
