"""``peerpipe demo``: see peerpipe work on this machine with nothing downloaded.

Until the trained bundled model lands, the demo writes a small random-weight Llama (with a real
BPE tokenizer) into the user's cache folder, opens a room of local nodes on 127.0.0.1 that join
it by code, and generates a short answer. The answer is gibberish by construction; the point
is the machinery: the code, the encrypted joins, the loading and the decode speed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peerpipe.cli.progress import LoadProgress
from peerpipe.paths import cache_dir

DEMO_PROMPT = "The quiet harbour at dawn"


def demo_model_dir() -> Path:
    return cache_dir() / "demo-model-v1"


def ensure_demo_model(path: Path) -> Path:
    from peerpipe.devtools.tiny_model import tiny_config, write_random_model

    if (path / "config.json").is_file():
        return path
    cfg = tiny_config(
        "llama",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    tmp = path.with_name(path.name + ".partial")
    write_random_model(tmp, cfg, seed=1234)
    tmp.rename(path)  # atomic: a crash never leaves a half-written model behind
    return path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a room of local nodes with a small built-in model")
    p.add_argument("--nodes", type=int, default=3, help="local nodes in the room (3)")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peerpipe.cli.demo_room import run_local_room
    from peerpipe.cli.generate_cmd import show_text
    from peerpipe.engine.generate import LocalEngine, encode_prompt
    from peerpipe.engine.loader import load_stage
    from peerpipe.engine.sampling import SamplingParams
    from peerpipe.engine.tokenizer import Tokenizer

    model = ensure_demo_model(demo_model_dir())
    print(f"model: {model} (small random-weight Llama; the trained bundled model is still to come)")
    run_local_room(args.nodes)
    tokenizer = Tokenizer.from_dir(model)
    ids = encode_prompt(tokenizer, args.prompt)
    with LoadProgress("loading model") as progress:
        stage, stats = load_stage(model, device="cpu", progress=progress)
    engine = LocalEngine(stage, tokenizer, max_seq=len(ids) + args.max_tokens)
    print(f"prompt: {args.prompt}")
    print("answer: ", end="", flush=True)

    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=args.max_tokens)
    result = engine.generate(ids, params, on_text=show_text)
    print()
    print(
        f"[{len(result.tokens)} tokens at {result.tok_s:.1f} tok/s on the CPU; {stats.bytes_read / 1e6:.1f} MB loaded]"
    )
    return 0
