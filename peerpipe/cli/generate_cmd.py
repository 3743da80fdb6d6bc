"""``peerpipe generate``: run a model on this machine and stream its answer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from peerpipe.cli.args import (
    MODEL_FORMS,
    BadValue,
    add_speculation_arguments,
    model_path,
    parse_address,
    positive_float,
    positive_int,
)
from peerpipe.cli.progress import LoadProgress
from peerpipe.engine.errors import CacheError
from peerpipe.errors import PeerpipeError

if TYPE_CHECKING:  # torch loads only when a model runs: `peerpipe host` starts fast
    from peerpipe.engine.generate import LocalEngine
    from peerpipe.engine.sampling import SamplingParams
    from peerpipe.engine.speculate import Drafts
    from peerpipe.engine.tokenizer import Tokenizer
    from peerpipe.protocol import Sampling


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling flags shared by every command that generates text."""
    p.add_argument("--max-tokens", type=positive_int, default=128, help="most tokens to generate (128)")
    p.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy; default: the model's setting, else 0"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="HF-style penalty (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)"
    )
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text with a model on this machine, or ask a room (--room)", description=run.__doc__
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    p.add_argument(
        "--model", type=model_path, metavar="MODEL", help=f"the model to run here: {MODEL_FORMS}"
    )
    p.add_argument("--room", metavar="CODE", help="ask the room with this code instead of running a model here")
    p.add_argument("--peer", type=parse_address, metavar="HOST:PORT", help="the room's host (default: found by code)")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        help="seconds to wait for a room's answer, its start-up included (600)",
    )
    add_sampling_arguments(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or webgpu (default: the best one here)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="weights dtype (bf16 on GPUs, fp32 on CPUs)"
    )
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for the model (default: one per core)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, ids and speed")
    add_speculation_arguments(
        p,
        speculate_help="draft tokens and verify them in one pass: ngram looks them up in the prompt and answer, "
        "draft runs --draft (default here: draft with --draft, else ngram; with --room: the host's setting)",
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument(
        "--quantize", choices=["none", "int8", "int4", "keep"], default="none",
        help="hold the layers' matrices in int8 (faster on CPUs) or int4 (a quarter of bf16's memory), or keep a "
        "GGUF's as precise as the file stores them: 4-bit types in int4, 5- to 8-bit in int8 (none)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="on CUDA, torch.compile the layers first (slower start, faster decode)",
    )
    p.set_defaults(func=run)


def flag_names(text: str) -> str:
    """The sampling record's field names in a message (``Sampling.top_p``, ``top_p``) as the flags that set them."""
    import re

    from peerpipe.inference.sampling import FIELDS

    fields = "|".join(FIELDS)
    return re.sub(rf"\b(?:Sampling\.)?({fields})\b", lambda m: "--" + m.group(1).replace("_", "-"), text)


def sampling(args: argparse.Namespace) -> Sampling:
    """The sampling flags as the wire's record; a value it refuses is a bad value, named by its flag."""
    from peerpipe.inference.sampling import InvalidSamplingParams, sampling_from

    try:
        return sampling_from(vars(args))
    except InvalidSamplingParams as exc:
        raise BadValue(flag_names(str(exc))) from None


def sampling_params(args: argparse.Namespace, model_dir: Path) -> SamplingParams:
    """Flags first, then the model's generation_config.json, then greedy."""
    from peerpipe.engine.defaults import GenerationDefaults
    from peerpipe.inference.sampling import InvalidSamplingParams

    try:
        return GenerationDefaults.from_dir(model_dir).resolve(sampling(args), args.max_tokens)
    except InvalidSamplingParams as exc:  # (what only the sampler checks: ranges, empty stops)
        raise BadValue(flag_names(str(exc))) from None


# Flags that run a model here: with --room the host's own settings run it.
LOCAL_ONLY = ("model", "device", "dtype", "threads", "draft", "speculate_max", "compile", "no_cuda_graphs")


def show_text(text: str) -> None:
    """Stream generated text to the terminal as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    """Generate text: with --model on this machine, or with --room CODE on a room's pipeline (the
    host runs the prompt through its stages and streams the answer back)."""
    if args.system is not None and not args.chat:
        raise BadValue("--system is the system message of --chat: give both")
    if args.room:
        if args.draft:
            raise BadValue("a room drafts with its host's --draft; give --speculate draft to ask for it")
        given = [name for name in LOCAL_ONLY if getattr(args, name) not in (None, False)]
        given += ["quantize"] if args.quantize != "none" else []
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise BadValue(f"{flags} run a model here; with --room the room's host runs its own")
        sampling(args)  # (a bad value before the room is looked for; here, after the context is checked)
        return run_remote(args)
    if args.model is None:
        raise PeerpipeError("give --model DIR to run a model here, or --room CODE to ask a room")
    from peerpipe.engine.config import ModelConfig
    from peerpipe.engine.generate import LocalEngine, encode_prompt
    from peerpipe.engine.loader import load_stage
    from peerpipe.engine.tokenizer import Tokenizer

    cfg = ModelConfig.from_dir(args.model)  # first: it says best whether this is a model we run
    if args.threads is not None:
        from peerpipe.compute import set_threads

        try:
            set_threads(args.threads)
        except ValueError as exc:
            raise PeerpipeError(str(exc)) from None
    tokenizer = Tokenizer.from_dir(args.model)
    ids = encode_prompt(tokenizer, args.prompt, chat=args.chat, system=args.system)
    if len(ids) + args.max_tokens > cfg.max_positions:
        raise CacheError(
            f"the prompt ({len(ids)} tokens) plus --max-tokens {args.max_tokens} exceeds this model's "
            f"context of {cfg.max_positions} positions"
        )
    params = sampling_params(args, args.model)
    with LoadProgress("loading model") as progress:
        if args.device == "webgpu":  # WGSL kernels through wgpu (webgpu/)
            from peerpipe.webgpu.load import load_webgpu_stage

            stage, _ = load_webgpu_stage(args.model, dtype=args.dtype, progress=progress, cfg=cfg, quantize=args.quantize)
        else:
            stage, _ = load_stage(
                args.model, device=args.device, dtype=args.dtype, progress=progress, cfg=cfg, quantize=args.quantize
            )
    # Size the cache for this one request instead of the model's whole context.
    engine = LocalEngine(
        stage,
        tokenizer,
        max_seq=len(ids) + args.max_tokens,
        cuda_graphs=False if args.no_cuda_graphs else None,
        compile_layers=args.compile,
    )
    drafts = local_drafts(args, engine, tokenizer, params, cfg.vocab_size)
    if args.json:
        result = engine.generate(ids, params, drafts=drafts)
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return 0

    result = engine.generate(ids, params, on_text=show_text, drafts=drafts)
    sys.stdout.write("\n")
    print(
        f"[{len(result.tokens)} tokens, {result.tok_s:.1f} tok/s, finish: {result.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def local_drafts(
    args: argparse.Namespace, engine: LocalEngine, tokenizer: Tokenizer, params: SamplingParams, vocab: int
) -> Drafts | None:
    """How this answer drafts: prompt lookup by default, the --draft model with it (on the
    engine's device), or not at all."""
    from peerpipe.engine.draft_model import DraftModel
    from peerpipe.engine.speculate import DEFAULT_MAX_DRAFT, Drafts, DraftSize, NgramDrafter, StepCosts

    mode = args.speculate or ("draft" if args.draft else "ngram")
    if mode == "off":
        return None
    size = DraftSize(StepCosts(), args.speculate_max or DEFAULT_MAX_DRAFT)
    if mode == "ngram":
        return Drafts(mode, NgramDrafter(), size)
    if args.draft is None:
        raise PeerpipeError("--speculate draft needs --draft DIR (austen-draft for the bundled model)")
    draft = DraftModel.load(  # which checks that it shares the model's tokenizer
        args.draft, tokenizer, vocab_limit=vocab, sessions=1, max_seq=engine.cache.max_seq,
        device=str(engine.device), dtype=str(next(engine.stage.parameters()).dtype).removeprefix("torch."),
    )
    return Drafts(mode, draft.session(params), size)


def run_remote(args: argparse.Namespace) -> int:
    import uuid

    from peerpipe.cli.room_registry import locate_host
    from peerpipe.engine.speculate import SpecStats
    from peerpipe.inference.client import remote_generate
    from peerpipe.inference.errors import InferenceError
    from peerpipe.protocol import GenerateRequest
    from peerpipe.protocol.answers import MAX_WAIT_S
    from peerpipe.room import parse_code
    from peerpipe.transport import run

    code = parse_code(args.room)
    address = args.peer or locate_host(str(code), code.nameplate, args.timeout)
    request = GenerateRequest(
        uuid.uuid4().hex,
        args.prompt,
        sampling(args),
        chat=args.chat,
        system=args.system or "",
        wait_s=min(args.timeout, MAX_WAIT_S),
        speculate=args.speculate,
    )

    def waiting(why: str) -> None:
        print(f"waiting for the room to be ready ({why}), up to {args.timeout:g} s", file=sys.stderr, flush=True)

    shown: list[str] = []

    def show(text: str) -> None:
        shown.append(text)
        show_text(text)

    try:
        done = run(
            remote_generate(code, address, request, None if args.json else show, timeout_s=args.timeout, on_wait=waiting)
        )
        if done.error:
            raise InferenceError(done.error)
    except InferenceError as exc:
        if not shown:
            raise
        print(flush=True)  # (the error's line starts on a line of its own, after the text so far)
        raise InferenceError(f"the answer broke off after {len(''.join(shown))} characters: {exc}") from None
    n = len(done.tokens) - 1
    tok_s = n / done.decode_s if n > 0 and done.decode_s > 0 else 0.0
    if args.json:
        out = {
            "text": done.text,
            "tokens": list(done.tokens),
            "prompt_ids": list(done.prompt_ids),
            "finish_reason": done.finish_reason,
            "tok_s": round(tok_s, 3),
            "prefill_s": round(done.prefill_s, 6),
            "decode_s": round(done.decode_s, 6),
            "stages": list(done.stages),
        }
        if done.speculate:
            spec = SpecStats(done.speculate, done.steps, done.drafted, done.accepted, done.steps + done.accepted)
            out["speculation"] = spec.to_json()
        print(json.dumps(out, ensure_ascii=False))
        return 0
    sys.stdout.write("\n")
    where = " -> ".join(done.stages)
    print(f"[{len(done.tokens)} tokens, {tok_s:.1f} tok/s, finish: {done.finish_reason}; {where}]", file=sys.stderr)
    return 0
