"""A single answer's decode-step kernels on CUDA, ours against torch's, over the Llama-3.2-1B and
Llama-3-8B shapes: bf16 matrix products of one row (engine/bf16_gluon.py against cuBLAS) and
attention over the cache (engine/attention_cuda.py against SDPA).

Each kernel is replayed from a CUDA graph, as a decode step runs it, over copies of its inputs
(a product's matrix: over 256 MB in all, several times the L2; attention: 16 layers' caches)
visited in turn. ``--sweep`` also times every tile choice and prints the best, which is how
``bf16_gluon.choose`` and ``attention_cuda``'s defaults were set. Prints a table and a final
JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MATRICES = {  # name: (N, K)
    "1b q|k|v": (3072, 2048), "1b o": (2048, 2048), "1b gate|up": (16384, 2048), "1b down": (2048, 8192),
    "1b head": (128256, 2048),
    "8b q|k|v": (6144, 4096), "8b o": (4096, 4096), "8b gate|up": (28672, 4096), "8b down": (4096, 14336),
    "8b head": (128256, 4096),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    """Milliseconds of one replay of ``fn``'s captured graph."""
    import torch

    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20


def plans(n: int, k: int) -> list[tuple[dict[str, int], int]]:
    from peerpipe.engine.int8_gluon import _splits

    out = []
    for rows, tk, warps, target in itertools.product((1, 2, 4), (16, 32), (4, 8), (0, 256, 512)):
        words = k // 2
        if words % (tk * 4):
            continue
        block = rows * (32 // tk) * warps
        split = _splits(-(-n // block), words, tk * 4, target=target, most=8) if target else 1
        out.append((dict(R=rows, TN=32 // tk, TK=tk, W=warps), split))
    return out


ATTENTION = {  # name: (KV heads, query rows per KV head, head dim, cached positions)
    "1b 256": (8, 4, 64, 256), "1b 1024": (8, 4, 64, 1024), "8b 256": (8, 4, 128, 256), "8b 1024": (8, 4, 128, 1024),
    "8b 4096": (8, 4, 128, 4096),
}


def attention_row(name: str, kv: int, g: int, d: int, length: int, sweep: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from peerpipe.engine import attention_cuda

    layers = []
    for _ in range(16):
        store = torch.randn(1, length, 2, kv, d, device="cuda", dtype=torch.bfloat16)  # KVCache's layout
        q = torch.randn(1, kv, g, d, device="cuda", dtype=torch.bfloat16)
        layers.append((q, store.select(2, 0).transpose(1, 2), store.select(2, 1).transpose(1, 2)))
    mask = torch.zeros(1, 1, 1, length, device="cuda", dtype=torch.bfloat16)
    mask[..., length - length // 8:] = float("-inf")  # a bucket's unused tail
    scale = d**-0.5

    def ours(tune: dict[str, int] | None = None) -> float:
        return timed(lambda: [attention_cuda.decode_attention(q, k, v, mask, scale, tune) for q, k, v in layers]) / 16

    sdpa = timed(lambda: [F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
                          for q, k, v in layers]) / 16
    mine = ours()
    row = {"attention": name, "sdpa_us": round(sdpa * 1e3, 2), "ours_us": round(mine * 1e3, 2),
           "speedup": round(sdpa / mine, 2)}
    if sweep:
        tunes = [dict(split=sp, block=bl, warps=w, stages=st) for sp, bl, w, st
                 in itertools.product((1, 2, 4, 8), (32, 64), (2, 4), (1, 3)) if length >= sp * bl]
        best = min(((ours(t), t) for t in tunes), key=lambda x: x[0])
        row["best_us"], row["best"] = round(best[0] * 1e3, 2), best[1]
    log(f"attention {name}: SDPA {row['sdpa_us']} us, ours {row['ours_us']} us"
        + (f", best {row['best_us']} us {row['best']}" if sweep else ""))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrices", default=",".join(MATRICES))
    p.add_argument("--sweep", action="store_true", help="time every tile choice too")
    p.add_argument("--only", choices=("products", "attention"), default=None)
    args = p.parse_args()
    import torch
    import torch.nn.functional as F

    from peerpipe.engine import attention_cuda, bf16_gluon

    if not torch.cuda.is_available() or not bf16_gluon.prepare(torch.device("cuda")):
        raise SystemExit("bench/kernels.py needs a CUDA GPU of compute capability 8.0+ and Triton's Gluon")
    attention_cuda.prepare(torch.device("cuda"))
    began = time.perf_counter()
    rows_out = []
    attention = [attention_row(name, *shape, args.sweep) for name, shape in ATTENTION.items()] if args.only != "products" else []
    for name in args.matrices.split(",") if args.only != "attention" else []:
        n, k = MATRICES[name]
        copies = max(2, -(-256_000_000 // (n * k * 2)))
        mats = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in (1,):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in mats]
            pairs = list(zip(xs, mats, strict=True))
            cublas = timed(lambda p=pairs: [F.linear(x, w) for x, w in p]) / copies
            chosen = bf16_gluon.choose(n, k, m)
            ours = timed(lambda p=pairs, c=chosen: [bf16_gluon.gemv(x, w, c) for x, w in p]) / copies
            want = xs[0].double() @ mats[0].double().T
            err = float((bf16_gluon.gemv(xs[0], mats[0]).double() - want).abs().max() / want.abs().max())
            row = {"matrix": name, "rows": m, "cublas_us": round(cublas * 1e3, 1), "gluon_us": round(ours * 1e3, 1),
                   "speedup": round(cublas / ours, 2), "gluon_tb_s": round(n * k * 2 / ours / 1e9, 2),
                   "cublas_tb_s": round(n * k * 2 / cublas / 1e9, 2), "rel_err": float(f"{err:.1e}"),
                   "tiles": chosen}
            if args.sweep:
                best = min(((timed(lambda p=pairs, c=c: [bf16_gluon.gemv(x, w, c) for x, w in p]) / copies, c)
                            for c in plans(n, k)), key=lambda t: t[0])
                row["best_us"], row["best"] = round(best[0] * 1e3, 1), best[1]
            if "gate|up" in name:  # and silu(gate) * up: cuBLAS then torch's kernel, against one of ours
                def unfused(p=pairs):  # type: ignore[no-untyped-def]
                    return [F.silu((g := F.linear(x, w).chunk(2, -1))[0]) * g[1] for x, w in p]

                row["glu_torch_us"] = round(timed(unfused) / copies * 1e3, 1)
                row["glu_ours_us"] = round(timed(lambda p=pairs: [bf16_gluon.gemv(x, w, glu=True) for x, w in p])
                                           / copies * 1e3, 1)
                if args.sweep:
                    glu_plans = {str(c[0]): (c[0], 1) for c in plans(n // 2, k)}.values()  # no split along K
                    best = min(((timed(lambda p=pairs, c=c: [bf16_gluon.gemv(x, w, c, glu=True) for x, w in p])
                                 / copies, c) for c in glu_plans), key=lambda t: t[0])
                    row["glu_best_us"], row["glu_best"] = round(best[0] * 1e3, 1), best[1]
                log(f"{name} with silu(gate) * up: torch {row['glu_torch_us']} us, ours {row['glu_ours_us']} us"
                    + (f", best {row['glu_best_us']} us {row['glu_best']}" if args.sweep else ""))
            rows_out.append(row)
            log(f"{name}, {m} row(s): cuBLAS {row['cublas_us']} us, Gluon {row['gluon_us']} us "
                f"({row['speedup']}x, {row['gluon_tb_s']} TB/s)" + (f", best {row['best_us']} us {row['best']}"
                                                                   if args.sweep else ""))
        del mats
    print(f"\n{'matrix':<12} {'rows':>4} {'cuBLAS us':>10} {'Gluon us':>9} {'ratio':>6} {'TB/s':>5}  best")
    for r in rows_out:
        print(f"{r['matrix']:<12} {r['rows']:>4} {r['cublas_us']:>10} {r['gluon_us']:>9} {r['speedup']:>6} "
              f"{r['gluon_tb_s']:>5}  {r.get('best_us', '')} {r.get('best', '')}")
    for r in rows_out:
        if "glu_ours_us" in r:
            print(f"{r['matrix']:<12} silu(gate)*up: torch {r['glu_torch_us']} us, ours {r['glu_ours_us']} us "
                  f"({round(r['glu_torch_us'] / r['glu_ours_us'], 2)}x)  {r.get('glu_best_us', '')} {r.get('glu_best', '')}")
    print(f"\n{'attention':<12} {'SDPA us':>8} {'ours us':>8} {'ratio':>6}  best")
    for r in attention:
        print(f"{r['attention']:<12} {r['sdpa_us']:>8} {r['ours_us']:>8} {r['speedup']:>6}  "
              f"{r.get('best_us', '')} {r.get('best', '')}")
    print(json.dumps({"bench": "kernels", "device": torch.cuda.get_device_name(), "products": rows_out,
                      "attention": attention,
                      "seconds": round(time.perf_counter() - began, 1)}))


if __name__ == "__main__":
    main()
