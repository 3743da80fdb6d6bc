#!/usr/bin/env python3
"""Build peerpipe's embedded default model: a small Llama trained on Jane Austen's novels.

Two steps, so that the GPU machine needs nothing but torch and numpy:

``prepare --out build/austen``
    Export the six novels from the Debian package ``r-cran-janeaustenr`` (through ``Rscript``),
    join the wrapped lines into paragraphs, hold out ~2% of them for validation, train a
    byte-level BPE tokenizer and write the token streams ``train.bin``/``val.bin`` (uint16)
    beside ``tokenizer.json``.

``train --data build/austen --out DIR``
    Train the model with plain torch (CUDA when present) and save it in the Hugging Face layout:
    config.json, model.safetensors, generation_config.json, tokenizer files and training.json
    with the figures of the run.

docs/default-model.md describes the model, the data's licence and the run that made the
shipped weights.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BOS, EOS = "<s>", "</s>"
BOS_ID, EOS_ID = 0, 1
VOCAB_SIZE = 4096
# One paragraph in VAL_EVERY goes to validation; picked by position so reruns agree.
VAL_EVERY = 50

# Each message is a paragraph ended by EOS, as in training; the reply is the next paragraph.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] | trim }}{{ eos_token }}{% endfor %}"
)

_R_EXPORT = (
    'library(janeaustenr); b <- austen_books(); cat(paste0(as.integer(b$book), "\\t", b$text), sep = "\\n")'
)
_HEADING = re.compile(r"^(chapter|volume)\s+([0-9]+|[ivxlc]+)\.?$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# prepare


def export_books() -> list[list[str]]:
    """The novels as lists of raw lines, in janeaustenr's order."""
    try:
        out = subprocess.run(
            ["Rscript", "-e", _R_EXPORT], check=True, capture_output=True, env=None
        ).stdout.decode("utf-8")
    except FileNotFoundError:
        sys.exit("Rscript not found: install r-base-core and r-cran-janeaustenr (Debian/Ubuntu)")
    except subprocess.CalledProcessError as e:
        sys.exit(f"Rscript failed; is r-cran-janeaustenr installed?\n{e.stderr.decode(errors='replace')}")
    books: dict[int, list[str]] = {}
    for line in out.split("\n"):
        if not line:
            continue
        book, _, text = line.partition("\t")
        books.setdefault(int(book), []).append(text)
    return [books[k] for k in sorted(books)]


def paragraphs(lines: list[str]) -> list[str]:
    """Join wrapped lines into paragraphs, dropping headings and title pages."""
    out: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line)
            continue
        if not current:
            continue
        text = " ".join(" ".join(current).split())
        current = []
        if _HEADING.match(text) or text == "by Jane Austen":
            continue
        # All-capital lines that are not speech are titles, "THE END" and "* * *" rules.
        if not re.search("[a-z]", text) and not text.startswith('"'):
            continue
        out.append(text)
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Like Llama: plain encode() starts with BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    assert tok.token_to_id(BOS) == BOS_ID and tok.token_to_id(EOS) == EOS_ID
    return tok


def stream(tok: Any, books: list[list[str]]) -> np.ndarray:
    """BOS opens each book; every paragraph is followed by EOS."""
    ids: list[int] = []
    for paras in books:
        ids.append(BOS_ID)
        for enc in tok.encode_batch(paras, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.uint16)


def cmd_prepare(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    books = [paragraphs(lines) for lines in export_books()]
    train_books: list[list[str]] = []
    val_books: list[list[str]] = []
    n = 0
    for paras in books:
        train_books.append([])
        val_books.append([])
        for p in paras:
            (val_books if n % VAL_EVERY == VAL_EVERY // 2 else train_books)[-1].append(p)
            n += 1
    tok = train_tokenizer([p for b in train_books for p in b], args.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    train, val = stream(tok, train_books), stream(tok, val_books)
    train.tofile(out / "train.bin")
    val.tofile(out / "val.bin")
    (out / "val.txt").write_text("\n".join(p for b in val_books for p in b) + "\n", encoding="utf-8")
    chars = sum(len(p) for b in books for p in b)
    meta = {
        "source": "Debian package r-cran-janeaustenr (austen_books())",
        "books": len(books),
        "paragraphs": n,
        "characters": chars,
        "val_every": VAL_EVERY,
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
        "vocab_size": tok.get_vocab_size(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


# --------------------------------------------------------------------------------------------
# model


@dataclass
class ModelArgs:
    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    intermediate_size: int = 1024
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 as Hugging Face's LlamaRMSNorm does, so the exported weights mean the same.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(args: ModelArgs, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (
        args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim)
    )
    freqs = torch.outer(torch.arange(seq, device=device).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)  # the rotate_half layout: halves, not interleaved pairs
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        h, d = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(h, args.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, args.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, args.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(args.num_attention_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        a = self.args
        q = self.q_proj(x).view(b, t, a.num_attention_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, a.num_key_value_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, a.num_key_value_heads, a.head_dim).transpose(1, 2)
        cos, sin = cos[:t].to(q.dtype), sin[:t].to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Expanded by hand: with enable_gqa=True SDPA may skip the flash kernel.
        rep = a.num_attention_heads // a.num_key_value_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class Llama(nn.Module):
    """A Llama whose parameter names, under ``model.``, are Hugging Face's."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.drop = nn.Dropout(args.dropout)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # Residual outputs scaled down by depth (GPT-2's trick) keep early training stable.
                scale = (
                    1 / math.sqrt(2 * args.num_hidden_layers)
                    if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else 1.0
                )
                nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._rope is None or self._rope[0].device != ids.device or self._rope[0].shape[0] < ids.shape[1]:
            self._rope = rope_tables(self.args, self.args.max_position_embeddings, ids.device)
        cos, sin = self._rope
        x = self.drop(self.embed_tokens(ids))
        for layer in self.layers:
            x = layer(x, cos, sin)
        # Tied output head: the embedding matrix doubles as the LM head.
        return F.linear(self.norm(x), self.embed_tokens.weight)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in self.state_dict().items()}


# --------------------------------------------------------------------------------------------
# train


def hf_config(args: ModelArgs) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "vocab_size": args.vocab_size,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
    }


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: Llama, val: torch.Tensor, ctx: int, batch: int, device: torch.device) -> float:
    """Mean loss over the whole validation stream, cut into consecutive windows."""
    model.eval()
    n = (val.numel() - 1) // ctx
    x = val[: n * ctx].view(n, ctx)
    y = val[1 : n * ctx + 1].view(n, ctx)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(xb)
        total += F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="sum").item()
        count += yb.numel()
    model.train()
    return total / count


def save_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> int:
    """Write model.safetensors, or numbered shards plus their index when over ``max_shard_bytes``."""
    from safetensors.torch import save_file

    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes <= 0 or total <= max_shard_bytes:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return total
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def save_hf(
    model: Llama,
    state: dict[str, torch.Tensor],
    out: Path,
    data: Path,
    figures: dict[str, Any],
    max_shard_mib: float,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = model.args
    tensors = {f"model.{k}": v.to(torch.bfloat16).contiguous() for k, v in state.items()}
    figures["weights_bytes"] = save_weights(tensors, out, int(max_shard_mib * 2**20))
    (out / "config.json").write_text(json.dumps(hf_config(args), indent=2) + "\n")
    gen = {
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shutil.copyfile(data / "tokenizer.json", out / "tokenizer.json")
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": args.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    figures["folder_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.name != "training.json")
    (out / "training.json").write_text(json.dumps(figures, indent=2) + "\n")


def load_teacher(path: Path, device: torch.device) -> Llama:
    """A trained model of this script's making (e.g. the shipped default), to distil a smaller
    one from: ``--teacher`` trains the student on the teacher's next-token distributions."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    targs = ModelArgs(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
    )
    teacher = Llama(targs)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update({k.removeprefix("model."): v.float() for k, v in load_file(str(file)).items()})
    teacher.load_state_dict(state, strict=True)
    return teacher.to(device).eval().requires_grad_(False)


def cmd_train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = Path(args.data)
    train = torch.from_numpy(np.fromfile(data / "train.bin", dtype=np.uint16).astype(np.int64))
    val = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64))
    margs = ModelArgs(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        dropout=args.dropout,
    )
    model = Llama(margs).to(device)
    teacher = load_teacher(Path(args.teacher), device) if args.teacher else None
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    train_dev = train.to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    offsets = torch.arange(args.ctx + 1, device=device)
    print(
        f"device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} params={n_params:,} "
        f"train_tokens={train.numel():,} val_tokens={val.numel():,} steps={args.steps} "
        f"batch={args.batch}x{args.ctx}",
        flush=True,
    )
    best = (math.inf, -1)
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    # Summed on the device so that logging does not sync the GPU every step.
    loss_sum = torch.zeros((), device=device)
    loss_steps = 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        starts = torch.randint(
            0, train_dev.numel() - args.ctx - 1, (args.batch, 1), device=device, generator=gen
        )
        window = train_dev[starts + offsets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(window[:, :-1])
            if teacher is not None:
                with torch.no_grad():
                    soft = teacher(window[:, :-1]).float().log_softmax(-1).flatten(0, 1)
        loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
        if teacher is not None:
            # A draft's worth is how often it picks what the teacher picks: match its distributions.
            kl = F.kl_div(logits.float().log_softmax(-1).flatten(0, 1), soft, log_target=True, reduction="batchmean")
            loss = args.teacher_weight * kl + (1 - args.teacher_weight) * loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_sum += loss.detach()
        loss_steps += 1
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            # Mean over the steps since the last report, with dropout on.
            train_loss = loss_sum.item() / loss_steps
            loss_sum.zero_()
            loss_steps = 0
            val_loss = evaluate(model, val, args.ctx, 64, device)
            history.append({"step": step + 1, "train_loss": train_loss, "val_loss": val_loss})
            mark = ""
            if val_loss < best[0]:
                best = (val_loss, step + 1)
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                mark = " *"
            print(
                f"step {step + 1:5d}  loss {train_loss:.3f}  val {val_loss:.3f}  "
                f"lr {lr_at(step, args):.2e}  {time.perf_counter() - t0:6.1f}s{mark}",
                flush=True,
            )
    seconds = time.perf_counter() - t0
    # Train loss of the kept weights, without dropout, on as many tokens as validation has.
    model.load_state_dict(best_state)
    head = train[: min(train.numel(), max(val.numel(), 64 * args.ctx))]
    best_train = evaluate(model, head, args.ctx, 64, device)
    figures = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "params": n_params,
        "model": asdict(margs),
        "train_tokens": int(train.numel()),
        "val_tokens": int(val.numel()),
        "steps": args.steps,
        "batch_size": args.batch,
        "context": args.ctx,
        "tokens_seen": args.steps * args.batch * args.ctx,
        "epochs": round(args.steps * args.batch * args.ctx / train.numel(), 2),
        "lr": args.lr,
        "min_lr": args.min_lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "teacher": Path(args.teacher).name if args.teacher else None,
        "teacher_weight": args.teacher_weight if args.teacher else None,
        "seconds": round(seconds, 1),
        "final_train_loss": round(history[-1]["train_loss"], 4),
        "final_val_loss": round(history[-1]["val_loss"], 4),
        "best_step": best[1],
        "best_val_loss": round(best[0], 4),
        "best_val_perplexity": round(math.exp(best[0]), 2),
        "best_train_loss_eval": round(best_train, 4),
        "history": [{k: round(v, 4) for k, v in h.items()} for h in history],
    }
    save_hf(model, best_state, Path(args.out), data, figures, args.max_shard_mib)
    print(json.dumps({k: v for k, v in figures.items() if k != "history"}, indent=2), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="export the novels, train the tokenizer, write token streams")
    p.add_argument("--out", default="build/austen")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    p.set_defaults(func=cmd_prepare)
    t = sub.add_parser("train", help="train the model and save it in the Hugging Face layout")
    t.add_argument("--data", default="build/austen")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--ctx", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--min-lr", type=float, default=1e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--dropout", type=float, default=0.4)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--hidden", type=int, default=384)
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--heads", type=int, default=6)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--intermediate", type=int, default=1024)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--teacher", default="", help="a trained model folder to distil from (a draft model)")
    t.add_argument("--teacher-weight", type=float, default=0.9, help="share of the loss that matches the teacher")
    t.add_argument(
        "--max-shard-mib",
        type=float,
        default=15,
        # The device tool brings back files of at most 16 MiB; 0 writes a single file.
        help="split the weights into shards of at most this size in MiB (0: one file)",
    )
    t.set_defaults(func=cmd_train)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
