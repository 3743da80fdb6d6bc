"""``peerpipe bench``, ``peerpipe status`` and ``peerpipe plan``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from peerpipe.cli.args import (
    MODEL_FORMS,
    add_strategy_arguments,
    model_path,
    parse_address,
    positive_float,
    positive_int,
)
from peerpipe.errors import PeerpipeError

GiB = 1 << 30


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _progress(step: str) -> None:
    print(f"  measuring {step} ...", file=sys.stderr, flush=True)


# -- bench ------------------------------------------------------------------------------------


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure this machine's device (and one layer of a model)", description=bench_cmd.__doc__)
    p.add_argument("--model", type=model_path, metavar="MODEL", help=f"also time one layer of this model: {MODEL_FORMS}")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps, xpu or webgpu (default: the best one present)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the layer (default: bf16 on GPUs, fp32 on CPUs)")
    p.add_argument("--no-cache", action="store_true", help="measure again instead of reading earlier results")
    p.add_argument("--quick", action="store_true", help="shorter, less precise measurements")
    p.add_argument("--webgpu", action="store_true", help="also look for a WebGPU adapter (needs the wgpu extra)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=bench_cmd)


def bench_cmd(args: argparse.Namespace) -> int:
    """Measure this machine: device, matmul TFLOPS, memory bandwidth, launch latency, and with
    --model one of the model's layers for decode and prefill. Results are cached per device."""
    import asyncio

    from peerpipe.cluster.local import LocalDevice
    from peerpipe.cluster.model_choice import ModelChoice

    started = time.perf_counter()
    device = asyncio.run(
        LocalDevice.measure(args.device, quick=args.quick, use_cache=not args.no_cache, progress=_progress)
    )
    timing = model = None
    if args.model:
        model = ModelChoice.from_dir(args.model, dtype=args.dtype or device.default_dtype)
        timing = asyncio.run(device.layer_timing(model.shape_json, model.dtype))
    caps, bench = device.caps, device.bench
    webgpu = ""
    if args.webgpu:
        from peerpipe.cluster.capabilities import wgpu_adapter

        webgpu = wgpu_adapter()
    out: dict[str, Any] = {
        "device": {**caps.to_json(), "wgpu_adapter": webgpu},
        "benchmark": bench.to_json(),
        "shared_memory_gbps": device.shm_gbps,  # hidden states to a node of this machine
        "cached": list(device.cache.hits),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if timing is not None and model is not None:
        whole = model.config.n_layers * timing.decode_ms
        out["layer"] = {
            "model": model.model_id,
            "shape": timing.shape_key,
            "dtype": timing.dtype,
            "decode_ms": timing.decode_ms,
            "prefill_ms": timing.prefill_ms,
            "prefill_tokens": timing.prefill_tokens,
            "layer_bytes": timing.layer_bytes,
            "layers": model.config.n_layers,
            "all_layers_tok_s": 1e3 / whole,
        }
    if args.json:
        print(json.dumps(out))
        return 0
    rows = [
        ["device", f"{caps.kind} ({caps.torch_device}): {caps.name}"],
        ["memory", f"{caps.memory_free_bytes / GiB:.1f} GiB free of {caps.memory_total_bytes / GiB:.1f} GiB"],
        ["half precision", f"fp16 {'yes' if caps.supports_f16 else 'no'}, bf16 {'yes' if caps.supports_bf16 else 'no'}"],
        ["CPU", f"{caps.cpu_cores} cores, {caps.ram_total_bytes / GiB:.1f} GiB RAM"],
        ["matmul fp32 1024", f"{bench.tflops_1024:.3f} TFLOPS"],
    ]
    if bench.big_size != 1024:  # quick CPU runs measure 1024 only: one line, not the same twice
        rows.append([f"matmul fp32 {bench.big_size}", f"{bench.tflops:.3f} TFLOPS"])
    if bench.tflops_half:
        rows.append([f"matmul {bench.half_dtype} {bench.big_size}", f"{bench.tflops_half:.3f} TFLOPS"])
    rows += [["memory bandwidth", f"{bench.memory_gbps:.1f} GB/s"], ["launch latency", f"{bench.launch_ms * 1e3:.1f} us"]]
    if device.shm_gbps:
        rows.append(["to a node of this machine", f"{device.shm_gbps:.1f} GB/s through shared memory"])
    if args.webgpu:
        rows.append(["WebGPU adapter", webgpu or "none (install the wgpu extra: pip install 'peerpipe[wgpu]')"])
    if "layer" in out:
        layer = out["layer"]
        rows += [
            ["layer", f"{layer['model']} ({layer['shape']}, {layer['dtype']}, {layer['layer_bytes'] / 1e6:.1f} MB)"],
            ["layer decode", f"{layer['decode_ms']:.3f} ms per token"],
            ["layer prefill", f"{layer['prefill_ms']:.3f} ms per {layer['prefill_tokens']} tokens"],
            ["all layers", f"{layer['all_layers_tok_s']:.1f} tok/s if this device held all {layer['layers']}"],
        ]
    print(_table(rows, ["what", "measured"]))
    if device.cache.hits:
        print(f"(from the cache: {', '.join(device.cache.hits)}; --no-cache measures again)")
    return 0


# -- status -----------------------------------------------------------------------------------


def _add_room_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--code", help="the room's code (default: the room this machine hosts or joined)")
    p.add_argument("--peer", type=parse_address, metavar="HOST:PORT", help="the host's address")
    p.add_argument("--timeout", type=positive_float, default=10.0, help="seconds to wait for the host (10)")


def _fetch_view(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from peerpipe.cli.room_registry import locate_host, the_room
    from peerpipe.cluster.observer import fetch_view
    from peerpipe.room import parse_code
    from peerpipe.transport import run

    if args.code:
        code = parse_code(args.code)
        peer = args.peer or locate_host(str(code), code.nameplate, args.timeout)
    else:
        entry = the_room()
        code = parse_code(entry.code)
        peer = args.peer or parse_address(entry.host)
    return run(fetch_view(code, peer, timeout_s=args.timeout))


def add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the room's nodes, their devices and the plan", description=status_cmd.__doc__)
    _add_room_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=status_cmd)


def view_to_json(view) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    # A node may hold several stages (the host, after standbys took over from nodes it lost), and standbys.
    held: dict[str, list[list[int]]] = {}
    spare: dict[str, list[list[int]]] = {}
    predicted: dict[str, float] = {}
    for s in view.plan.stages if view.plan else ():
        held.setdefault(s.node_id, []).append([s.start, s.end])
        if s.predicted_ms:
            predicted[s.node_id] = predicted.get(s.node_id, 0.0) + s.predicted_ms
    for s in view.plan.standbys if view.plan else ():
        spare.setdefault(s.node_id, []).append([s.start, s.end])
    measured = view.measured_ms or None
    return {
        "epoch": view.epoch,
        "nodes": [
            {
                "node_id": m.info.node_id,
                "name": m.info.name,
                "address": m.info.address,
                "device": m.info.device,
                "device_name": m.info.device_name,
                "quantize": m.info.quantize,
                "tflops": m.info.tflops,
                "tflops_half": m.info.tflops_half,
                "memory_gbps": m.info.memory_bandwidth_gbps,
                "memory_bytes": m.info.memory_bytes,
                "health": m.health,
                "status": m.status,
                "load": m.load,
                "heartbeat_age_ms": m.heartbeat_age_ms,
                "layers": held.get(m.info.node_id, []),  # [start, end) ranges, in pipeline order
                "standby_layers": spare.get(m.info.node_id, []),
                "layer_decode_ms": m.timing.decode_ms if m.timing else None,
                "predicted_ms_per_step": predicted.get(m.info.node_id),
                "measured_ms_per_step": m.compute_s * 1e3 / m.steps if m.steps else None,
            }
            for m in view.members
        ],
        "plan": None
        if view.plan is None
        else {
            "version": view.plan.version,
            "model": view.plan.model_id,
            "stages": [
                {"node": s.node_id, "start": s.start, "end": s.end, "wire": s.wire or "native"} for s in view.plan.stages
            ],
            "standbys": [{"node": s.node_id, "start": s.start, "end": s.end} for s in view.plan.standbys],
            "predicted_ms_per_token": view.plan.predicted_ms,
            "measured_ms_per_token": measured,
            "lanes": view.plan.lanes,  # stages that can compute at once (a GPU, or cores, each)
            "acked": list(view.acked),
        },
        "links": [{"src": x.src, "dst": x.dst, "rtt_ms": x.rtt_ms, "mib_per_s": x.mib_per_s} for x in view.links],
        "tasks": [
            {
                "task_id": t.task_id,
                "status": t.status,
                "prompt_tokens": t.prompt_tokens,
                "tokens": t.tokens,
                "tok_s": t.tok_s,
                "error": t.error,
            }
            for t in view.tasks
        ],
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def status_cmd(args: argparse.Namespace) -> int:
    """Show the room: every node's device, TFLOPS, memory bandwidth and memory, how long ago it
    beat, which layers it holds, and the round trips between nodes."""
    view = _fetch_view(args)
    data = view_to_json(view)
    if args.json:
        print(json.dumps(data))
        return 0
    print_status(data)
    return 0


def print_status(data: dict[str, Any]) -> None:
    """``status``'s tables, from its JSON (``view_to_json``)."""
    from peerpipe.cluster.membership import unique_names

    names = unique_names({n["node_id"]: n["name"] for n in data["nodes"]})
    rows = []
    for n in data["nodes"]:
        layers = " ".join(f"[{a},{b})" for a, b in n["layers"]) + "".join(f" +[{a},{b}) spare" for a, b in n["standby_layers"])
        rows.append(
            [
                names[n["node_id"]],
                f"{n['device']} {n['device_name']}"[:40] + (f" ({n['quantize']})" if n["quantize"] != "none" else ""),
                f"{n['tflops']:.2f}",
                f"{n['memory_gbps']:.0f}",
                f"{n['memory_bytes'] / GiB:.1f}",
                f"{n['heartbeat_age_ms'] / 1e3:.1f}s {n['health']}",
                f"{n['status']} {n['load']:.0%}",
                layers.strip() or "-",
                f"{_ms(n['predicted_ms_per_step'])} / {_ms(n['measured_ms_per_step'])}",
            ]
        )
    print(f"room epoch {data['epoch']}: {len(rows)} node(s)")
    header = ["node", "device", "TFLOPS", "GB/s", "mem GiB", "heartbeat", "load", "layers", "ms/step pred / meas"]
    print(_table(rows, header))
    plan = data["plan"]
    if plan:
        acked = len(plan["acked"])
        measured = plan["measured_ms_per_token"]
        pace = f", {measured:.2f} measured" if measured is not None else ", none measured yet"
        print(
            f"plan v{plan['version']} of {plan['model']}: {plan['predicted_ms_per_token']:.2f} ms/token predicted"
            f"{pace}; acknowledged by {acked}"
        )
        hops = [s["wire"] for s in plan["stages"][:-1]]
        if any(h != "native" for h in hops):
            print("hidden states between stages: " + ", ".join(hops))
    else:
        print("no plan yet: the host plans once it has a model and its --expect-nodes have joined")
    if data["tasks"]:
        task_rows = [
            [t["task_id"][:8], t["status"], str(t["prompt_tokens"]), str(t["tokens"]), f"{t['tok_s']:.1f}"]
            for t in data["tasks"]
        ]
        print(_table(task_rows, ["task", "status", "prompt", "tokens", "tok/s"]))
    if data["links"]:
        link_rows = [
            [names.get(x["src"], x["src"][:8]), names.get(x["dst"], x["dst"][:8]), f"{x['rtt_ms']:.3f}", f"{x['mib_per_s']:.0f}"]
            for x in data["links"]
        ]
        print(_table(link_rows, ["from", "to", "rtt ms", "MiB/s"]))


# -- plan -------------------------------------------------------------------------------------

NODE_KEYS = {"mem", "tflops", "gbps", "rtt", "mbit"}


def parse_node(text: str) -> dict[str, Any]:
    """``NAME:mem=GB,tflops=X[,gbps=Y][,rtt=MS][,mbit=MBIT]`` -> its fields."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:mem=GB,tflops=X[,gbps=Y]")
    fields: dict[str, Any] = {"name": name}
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        if not eq or key not in NODE_KEYS:
            raise argparse.ArgumentTypeError(f"{text!r}: unknown field {part!r}; use {', '.join(sorted(NODE_KEYS))}")
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {key} must be a number, got {value!r}") from None
        if not number > 0 or number == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: {key} must be a positive number")
        fields[key] = number
    missing = {"mem", "tflops"} - fields.keys()
    if missing:
        raise argparse.ArgumentTypeError(f"{text!r}: missing {', '.join(sorted(missing))}")
    return fields


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan a model over the room or over hypothetical machines", description=plan_cmd.__doc__)
    p.add_argument("--model", required=True, type=model_path, metavar="MODEL", help=f"the model: {MODEL_FORMS}")
    p.add_argument(
        "--node",
        action="append",
        type=parse_node,
        default=[],
        metavar="NAME:mem=GB,tflops=X[,gbps=Y]",
        help="a hypothetical machine: memory in GB, fp32 TFLOPS, optional memory bandwidth GB/s "
        "(default 20 per TFLOPS), rtt=MS and mbit=MBIT/S for its network (default 0.5 ms, 1000)",
    )
    p.add_argument("--add-to-room", action="store_true", help="plan the live room plus the --node machines")
    add_strategy_arguments(p)
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="weights dtype (default: what the room's host loads, float32 on a CPU and bfloat16 on a GPU; "
        "bfloat16 for hypothetical machines)",
    )
    p.add_argument("--context", type=positive_int, default=4096, help="tokens of KV cache per session (4096)")
    p.add_argument("--sessions", type=positive_int, default=4, help="concurrent answers to hold KV cache for (4)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_room_arguments(p)
    p.set_defaults(func=plan_cmd)


def _host_dtype(view: Any) -> str:
    """The dtype a room's host (listed first) loads when not told; bfloat16 without a room."""
    from peerpipe.cluster.capabilities import default_dtype

    return default_dtype(view.members[0].info.device) if view is not None and view.members else "bfloat16"


def plan_cmd(args: argparse.Namespace) -> int:
    """Plan which layers of --model each node holds: for the live room, for hypothetical
    machines (--node), or for both (--add-to-room). Exits non-zero when the model cannot fit."""
    from peerpipe.cluster.membership import unique_names
    from peerpipe.cluster.model_choice import ModelChoice
    from peerpipe.cluster.planning import hypothetical_nodes, links_with, network_from, node_spec
    from peerpipe.plan import Budget, DoesNotFitError, Link, Network, make_plan

    view = _fetch_view(args) if args.add_to_room or not args.node else None
    dtype = args.dtype or _host_dtype(view)
    model = ModelChoice.from_dir(args.model, dtype=dtype)
    spec = model.spec
    budget = Budget(context_tokens=args.context, sessions=args.sessions)
    specs, nic = hypothetical_nodes(spec, args.node)
    names = {s.node_id: s.node_id for s in specs}
    links: dict[tuple[str, str], Link] = {}
    entry = specs[0].node_id if specs else None
    if view is not None:
        alive = [m for m in view.members if m.health == "alive"]
        room = [node_spec(spec, m.info, m.timing, model.shape_key, half=model.half) for m in alive]
        names = unique_names({m.info.node_id: m.info.name for m in alive}) | names
        measured = network_from(view.links)
        links.update(measured.links)
        entry = room[0].node_id if room else entry  # the host is listed first
        specs = room + specs
    if len(set(names.values())) != len(names):
        raise PeerpipeError("two nodes share a name; give hypothetical nodes names of their own")
    links = links_with(specs, links, nic)
    started = time.perf_counter()
    try:
        result = make_plan(spec, specs, Network(links), budget, entry=entry, strategy=args.strategy, objective=args.objective)
    except DoesNotFitError as exc:
        if args.json:  # (a script reads why, and how much is missing, in the same shape)
            print(json.dumps({"model": model.model_id, "fits": False, "error": str(exc), "missing_bytes": exc.missing_bytes}))
        raise
    took = time.perf_counter() - started
    out = result.to_json()
    for stage in out["stages"]:
        stage["node"] = names.get(stage["node"], stage["node"])
    for detail in out["details"]:
        detail["node"] = names.get(detail["node_id"], detail["node_id"])
    out["unused"] = [names.get(u, u) for u in out["unused"]]
    out["model"] = model.model_id
    out["fits"] = True
    out["planning_ms"] = round(took * 1e3, 3)
    if args.json:
        print(json.dumps(out))
        return 0
    rows = [
        [d["node"], f"[{s['start']},{s['end']})", str(s["end"] - s["start"]), f"{d['memory_bytes'] / GiB:.2f}", f"{d['compute_ms']:.3f}"]
        for s, d in zip(out["stages"], out["details"], strict=True)
    ]
    print(f"{model.model_id}: {spec.num_layers} layers, {spec.total_weight_bytes / GiB:.2f} GiB of {dtype} weights")
    print(_table(rows, ["node", "layers", "count", "mem GiB", "ms/token"]))
    print(
        f"{args.strategy} plan: {result.predicted_ms_per_token:.2f} ms/token ({result.predicted_tokens_per_s:.1f} tok/s) "
        f"for one answer, {result.throughput_tokens_per_s:.1f} tok/s with the pipeline full; "
        f"first token of a 128-token prompt in {result.predicted_prefill_ms:.1f} ms"
    )
    if out["unused"]:
        print(f"not used (would slow the answer down or add nothing): {', '.join(out['unused'])}")
    return 0
