"""What fewer bytes cost in quality: perplexity and greedy agreement, side by side in one run.

Both kinds of fewer bytes: hidden states on the wire (``--wire``) and weights held in int8 or int4
(``--quantize``, on every stage or on the middle one only).

    python bench/quality.py                  # the bundled model, CPU, fp32

The bundled model is cut into 3 stages ([0, 2), [2, 4), [4, 6)) in this process, and the hidden
states between them go through each wire form exactly as a room sends them (encode on the
sender, decode on the receiver: inference/wire.py). For each form:

- perplexity on held-out Austen text (bench/data/austen-heldout.txt: paragraphs the model never
  trained on), in windows of 256 tokens;
- greedy agreement with the unquantized model: of the first 128 tokens of 32 prompts, how many
  equal its tokens, and how long the equal prefix is on average.

Prints a table, then one JSON line with each form's perplexity relative to the model's own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peerpipe.engine.loader import load_stage  # noqa: E402
from peerpipe.engine.tokenizer import Tokenizer  # noqa: E402
from peerpipe.inference.wire import encode_hidden, from_wire  # noqa: E402
from peerpipe.models import default_model_dir  # noqa: E402

CUTS = ((0, 2), (2, 4), (4, 6))
WINDOW = 256
CPU = torch.device("cpu")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Room:
    """Three stages in one process, the hidden states between them on the wire in ``wire``."""

    def __init__(
        self, model: Path, dtype: str, wire: str, quantize: tuple[str, str, str] = ("none",) * 3,
        sessions: int = 1, max_seq: int = 512,
    ) -> None:
        self.stages = [
            load_stage(model, a, b, device="cpu", dtype=dtype, quantize=q)[0] for (a, b), q in zip(CUTS, quantize, strict=True)
        ]
        self.caches = [s.new_cache(sessions, max_seq) for s in self.stages]
        self.wire = wire

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, slot: int, *, last_only: bool = False) -> torch.Tensor:
        x = ids
        for _i, (stage, cache) in enumerate(zip(self.stages, self.caches, strict=True)):
            batch = cache.batch([slot], ids.shape[1])
            x = stage(x, cache, batch, last_only=last_only and stage.is_last)
            if not stage.is_last:
                x = from_wire(encode_hidden(x, self.wire)[0], CPU).to(x.dtype)
        return x  # logits [1, S, V]

    def reset(self, slot: int) -> None:
        for cache in self.caches:
            cache.rollback(slot, 0)

    def alloc(self) -> int:
        slots = {c.alloc() for c in self.caches}
        assert len(slots) == 1
        return slots.pop()


def perplexity(room: Room, ids: list[int]) -> float:
    slot = room.alloc()
    total, count = 0.0, 0
    for at in range(0, len(ids) - 1, WINDOW):
        window = ids[at : at + WINDOW + 1]
        if len(window) < 2:
            break
        room.reset(slot)
        logits = room.forward(torch.tensor([window[:-1]]), slot)
        total += F.cross_entropy(logits[0].float(), torch.tensor(window[1:]), reduction="sum").item()
        count += len(window) - 1
    return math.exp(total / count)


@torch.inference_mode()
def greedy(room: Room, prompt: list[int], n: int) -> list[int]:
    slot = room.alloc() if not hasattr(room, "_slot") else room._slot  # type: ignore[attr-defined]
    room._slot = slot  # type: ignore[attr-defined]
    room.reset(slot)
    logits = room.forward(torch.tensor([prompt]), slot, last_only=True)
    out = [int(logits[0, -1].argmax())]
    while len(out) < n:
        logits = room.forward(torch.tensor([[out[-1]]]), slot, last_only=True)
        out.append(int(logits[0, -1].argmax()))
    return out


def run(args: argparse.Namespace) -> dict:
    model = default_model_dir()
    tokenizer = Tokenizer.from_dir(model)
    text = (ROOT / "bench" / "data" / "austen-heldout.txt").read_text()
    ids = tokenizer.encode(text)[: args.tokens]
    paragraphs = [p for p in text.split("\n") if len(p) > 80]
    prompts = [tokenizer.encode(p)[:24] for p in paragraphs[: args.prompts]]
    rows = []
    reference: list[list[int]] = []
    configs = [
        ("native", "", ("none",) * 3), ("wire bf16", "bf16", ("none",) * 3), ("wire fp16", "fp16", ("none",) * 3),
        ("wire int8", "int8", ("none",) * 3), ("wire fp8", "fp8", ("none",) * 3), ("weights int8", "", ("int8",) * 3), ("weights int4", "", ("int4",) * 3),
        ("int8 on 1 of 3", "", ("none", "int8", "none")), ("int4 on 1 of 3", "", ("none", "int4", "none")),
        ("wire+weights int8", "int8", ("int8",) * 3),
    ]
    for name, wire, quant in configs:
        began = time.perf_counter()
        room = Room(model, args.dtype, wire, quant, sessions=2)
        ppl = perplexity(room, ids)
        answers = [greedy(room, p, args.new_tokens) for p in prompts]
        if not reference:
            reference = answers
        same = sum(a == b for x, y in zip(answers, reference, strict=True) for a, b in zip(x, y, strict=True))
        prefixes = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
                    for x, y in zip(answers, reference, strict=True)]
        rows.append({
            "config": name, "perplexity": round(ppl, 4), "agreement": round(same / (len(prompts) * args.new_tokens), 4),
            "mean_equal_prefix": round(sum(prefixes) / len(prefixes), 1),
        })
        log(f"{name}: perplexity {ppl:.3f}, {time.perf_counter() - began:.0f} s")
    base = rows[0]["perplexity"]
    for r in rows:
        r["perplexity_change_pct"] = round(100 * (r["perplexity"] / base - 1), 3)
    return {"model": model.name, "dtype": args.dtype, "tokens": len(ids), "prompts": len(prompts),
            "new_tokens": args.new_tokens, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens to score")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    began = time.perf_counter()
    result = run(args)
    print(f"{'config':18} {'perplexity':>10} {'change %':>9} {'agreement':>9} {'equal prefix':>12}")
    for r in result["rows"]:
        print(f"{r['config']:18} {r['perplexity']:10.4f} {r['perplexity_change_pct']:9.3f} {r['agreement']:9.3f} "
              f"{r['mean_equal_prefix']:12.1f}")
    change = {r["config"]: r["perplexity_change_pct"] for r in result["rows"]}
    result["goals"] = {
        "int8_wire_within_0.5pct": change["wire int8"],
        "int8_weights_within_1pct": change["weights int8"],
        "int4_weights_within_5pct": change["weights int4"],
    }
    result["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
