"""int8 products launched as programmatic dependents, against ordinary launches, in one process.

    python bench/pdl.py --shapes llama-3.2-1b,llama-3-8b      # needs a Hopper GPU

Per shape it loads the weights twice (the model's dtype, int8), then decodes 64 tokens after a
32-token prompt with a freshly graphed local engine in each variant, round after round, the
order reversed every other round so drift falls on both sides:

- ``bf16``: the model's dtype, the baseline of the int8 ratio (issue #16's);
- ``off``: int8, every product launched as usual (``PEERPIPE_PDL=0``);
- ``every``: int8, every one-row product a dependent;
- ``default``: int8, products below ``int8_gluon.dependent_below`` weights dependents (the default).

A variant's figure is the median of its rounds (each the median of 5 answers). Prints a table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
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
from peerpipe.engine import int8_gluon  # noqa: E402
from peerpipe.engine.generate import LocalEngine  # noqa: E402
from peerpipe.engine.loader import load_stage  # noqa: E402
from peerpipe.engine.sampling import SamplingParams  # noqa: E402
from peerpipe.engine.tokenizer import Tokenizer  # noqa: E402

VARIANTS = ("bf16", "off", "every", "default")
SETTINGS = {"off": (False, int8_gluon.dependent_below), "every": (True, 1 << 62),
            "default": (True, int8_gluon.dependent_below)}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def decode_tok_s(stage: object, tokenizer: Tokenizer, new_tokens: int) -> float:
    import torch

    engine = LocalEngine(stage, tokenizer, max_seq=128)  # type: ignore[arg-type]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    prompt = [10 + i % 200 for i in range(32)]
    engine.generate(prompt, params)
    speed = statistics.median(engine.generate(prompt, params).tok_s for _ in range(5))
    del engine
    gc.collect()
    torch.cuda.empty_cache()  # the next variant captures its graphs afresh
    return speed


def run_shape(shape: str, tmp: Path, args: argparse.Namespace) -> dict:
    model = write_random_model(tmp / shape, tiny_config("llama", **SHAPES[shape]), seed=0, dtype="bfloat16",
                               shards=4 if shape == "llama-3.2-1b" else 1)
    tokenizer = Tokenizer.from_dir(model)
    stages = {"bf16": load_stage(model, device="cuda", dtype="bfloat16")[0],
              "int8": load_stage(model, device="cuda", dtype="bfloat16", quantize="int8")[0]}
    rounds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    asked = int8_gluon.overlap, int8_gluon.dependent_below
    try:
        for r in range(args.rounds):
            for variant in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
                if variant != "bf16":
                    int8_gluon.overlap, int8_gluon.dependent_below = SETTINGS[variant]
                stage = stages["bf16" if variant == "bf16" else "int8"]
                rounds[variant].append(decode_tok_s(stage, tokenizer, args.new_tokens))
            log(f"{shape} round {r + 1}: " + ", ".join(f"{v} {rounds[v][-1]:.1f}" for v in VARIANTS))
    finally:
        int8_gluon.overlap, int8_gluon.dependent_below = asked
    tok_s = {v: statistics.median(rounds[v]) for v in VARIANTS}
    return {"shape": shape, "tok_s": tok_s, "rounds": rounds,
            "int8_vs_bf16": {v: tok_s[v] / tok_s["bf16"] for v in VARIANTS[1:]},
            "vs_off": {v: [a / b for a, b in zip(rounds[v], rounds["off"], strict=True)] for v in VARIANTS[2:]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b", help="shapes of bench/engine.py")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("bench/pdl.py needs a Hopper GPU (programmatic dependent launch)")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_shape(shape, Path(tmp), args) for shape in args.shapes.split(",")]
    print(f"{'shape':14} {'variant':8} {'tok/s':>9} {'vs bf16':>8} {'vs off, by round':>24}")
    for res in results:
        for v in VARIANTS:
            ratio = f"{res['int8_vs_bf16'][v]:8.3f}" if v != "bf16" else f"{'1.000':>8}"
            by_round = " ".join(f"{x:.3f}" for x in res["vs_off"].get(v, []))
            print(f"{res['shape']:14} {v:8} {res['tok_s'][v]:9.1f} {ratio} {by_round:>24}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "results": results,
                      "seconds": round(time.perf_counter() - began, 1)}))


if __name__ == "__main__":
    main()
