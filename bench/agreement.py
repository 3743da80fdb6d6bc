"""How many greedy tokens of a room agree with the local engine's, on one device.

    python bench/agreement.py --device cuda --dtype bfloat16      # the bundled model, 2 stages

In float32 on a CPU they are equal by construction (the tests check it). In bfloat16 on a GPU a
stage boundary rounds the hidden state the same way the engine does, but the stages' graphs and
batch shapes can pick other kernels, so near-tied logits may flip. Prints, per prompt, the tokens
that agree and where they first differ, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peerpipe.cluster.config import ClusterConfig  # noqa: E402
from peerpipe.engine.generate import LocalEngine, encode_prompt  # noqa: E402
from peerpipe.engine.sampling import SamplingParams  # noqa: E402
from peerpipe.models import default_model_dir  # noqa: E402
from peerpipe.plan import Budget  # noqa: E402
from peerpipe.python_api import create_room, join_room  # noqa: E402

PROMPTS = [
    "It was a fine morning in April, and Emma",
    "Mr. Darcy walked into the room",
    "The letter from Mrs. Jennings said",
    "Elizabeth could not help laughing at",
    "Anne had always thought",
    "Captain Wentworth",
    "The ball at Netherfield",
    "Her father was",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    model = default_model_dir()
    engine, _ = LocalEngine.from_dir(model, device=args.device, dtype=args.dtype, max_seq=512)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    prompts = [encode_prompt(engine.tokenizer, p) for p in PROMPTS]
    local = [engine.generate(p, greedy).tokens for p in prompts]
    del engine

    async def room_tokens() -> list[list[int]]:
        config = ClusterConfig(
            expect_nodes=args.stages, strategy="proportional", budget=Budget(512, 8), replan_debounce_s=0.2
        )
        async with contextlib.AsyncExitStack() as stack:
            room = await stack.enter_async_context(
                create_room(model, device=args.device, dtype=args.dtype, config=config, quick=True)
            )
            for i in range(args.stages - 1):
                await stack.enter_async_context(
                    join_room(str(room.code), peer=room.address, model=model, name=f"m{i}", device=args.device, quick=True)
                )
            await room.plan(300)
            fields = {"temperature": 0.0, "max_tokens": args.tokens, "ignore_eos": True}
            return [(await room.generate(p, **fields)).tokens for p in prompts]

    remote = asyncio.run(room_tokens())
    rows = []
    for text, a, b in zip(PROMPTS, local, remote, strict=True):
        same = sum(x == y for x, y in zip(a, b, strict=True))
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        rows.append({"prompt": text, "equal": same, "of": len(a), "first_difference": first})
        print(f"{same:4d}/{len(a)} equal, first difference at {first}: {text}")
    total = sum(r["equal"] for r in rows)
    print(json.dumps({"bench": "agreement", "device": args.device, "dtype": args.dtype, "stages": args.stages,
                      "equal": total, "of": sum(r["of"] for r in rows), "rows": rows}))


if __name__ == "__main__":
    main()
