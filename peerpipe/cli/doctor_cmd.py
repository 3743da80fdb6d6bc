"""``peerpipe doctor``: check this machine for what a room needs, one line per check with a fix.

Each check is a small function that returns a ``Check``; none raises for what it finds, so one
broken part never hides the others. Only the mDNS check sends packets, and only on the interface
being checked (``--listen``), as a room would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from peerpipe.cli.args import MODEL_FORMS, model_path, parse_address
from peerpipe.cli.http_opts import DEFAULT_HTTP, HTTP_ENV

GiB = 1 << 30
LOW_MEMORY = 2 * GiB
LOW_DISK = 2 * GiB


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn or fail
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f"  -> {self.fix}" if self.fix and self.status != "ok" else ""
        return f"{self.status:<4}  {self.name:<11} {self.detail}{fix}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this machine for what a room needs, with a fix for each problem", description=run.__doc__)
    p.add_argument(
        "--listen",
        metavar="HOST[:PORT]",
        type=lambda text: parse_address(text, default_port=0),
        help="the address a room would use here: mDNS and the port are checked on it (default: the LAN address)",
    )
    p.add_argument(
        "--http", metavar="HOST:PORT", help=f"the API address to check (default: ${HTTP_ENV}, else {DEFAULT_HTTP})"
    )
    p.add_argument("--model", type=model_path, metavar="MODEL", help=f"also check this model and whether it fits here: {MODEL_FORMS}")
    p.add_argument("--device", help="the device to check (default: the best one present)")
    p.add_argument("--webgpu", action="store_true", help="also look for a WebGPU adapter (the wgpu extra)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check Python, PyTorch and its device, free memory and disk, the cache, the network address,
    the listen port (a local connect), mDNS on that interface, the HTTP port and, when given, a
    model. Exits 1 when a check fails; warnings do not."""
    from peerpipe.room import default_lan_ip

    host, port = args.listen or (default_lan_ip(), 0)
    http = parse_address(args.http or os.environ.get(HTTP_ENV) or DEFAULT_HTTP, default_port=8088)
    checks: list[Callable[[], Check]] = [
        python_check,
        torch_check,
        lambda: device_check(args.device),
        memory_check,
        disk_check,
        cache_check,
        lambda: address_check(host),
        lambda: port_check(host, port),
        lambda: mdns_check(host),
        lambda: http_check(*http),
    ]
    if args.model is not None:
        checks.append(lambda: model_check(args.model, args.device))
    if args.webgpu:
        checks.append(webgpu_check)
    results = []
    for check in checks:
        result = check()
        results.append(result)
        if not args.json:
            print(result.line(), flush=True)
    failed = [r for r in results if r.status == "fail"]
    if args.json:
        print(json.dumps({"checks": [asdict(r) for r in results], "ok": not failed}))
    elif failed:
        print(f"{len(failed)} check(s) failed", flush=True)
    return 1 if failed else 0


def python_check() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    return Check("python", "ok", f"{version} at {sys.executable}")


def torch_check() -> Check:
    try:
        import torch
    except ImportError as exc:
        return Check("torch", "fail", f"not importable ({exc})", "pip install torch (on a CPU-only machine: the CPU wheel)")
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else ("ROCm" if torch.version.hip else "CPU build")
    if not torch.cuda.is_available() and shutil.which("nvidia-smi") and not torch.version.cuda:
        return Check(
            "torch", "warn", f"{torch.__version__}, {build}, but this machine has an NVIDIA GPU",
            "install a CUDA build of PyTorch (https://pytorch.org/get-started/locally/)",
        )
    return Check("torch", "ok", f"{torch.__version__}, {build}")


def device_check(device: str | None) -> Check:
    from peerpipe.errors import PeerpipeError

    try:
        from peerpipe.cluster.capabilities import detect

        caps = detect(device)
    except (ImportError, RuntimeError, ValueError, PeerpipeError) as exc:
        return Check("device", "fail", f"cannot use {device or 'the default device'}: {exc}", "pass --device cpu, cuda:N or mps")
    free = caps.memory_free_bytes / GiB
    detail = f"{caps.torch_device}: {caps.name}, {free:.1f} GiB free of {caps.memory_total_bytes / GiB:.1f}"
    if caps.kind == "cpu":
        detail += f", {caps.cpu_cores} cores (no GPU seen by PyTorch)"
    return Check("device", "ok", detail)


def memory_check() -> Check:
    from peerpipe.cluster.capabilities import memory_info

    total, free = memory_info()
    detail = f"{free / GiB:.1f} GiB of {total / GiB:.1f} GiB RAM free"
    if free < LOW_MEMORY:
        return Check("memory", "warn", detail, "close other programs, or offer this node with --memory GB")
    return Check("memory", "ok", detail)


def disk_check() -> Check:
    from peerpipe.paths import cache_dir

    where = _existing_parent(cache_dir())
    free = shutil.disk_usage(where).free
    detail = f"{free / GiB:.1f} GiB free at {where}"
    if free < LOW_DISK:
        return Check("disk", "warn", detail, "free some space: model weights need room (or set $PEERPIPE_CACHE elsewhere)")
    return Check("disk", "ok", detail)


def cache_check() -> Check:
    from peerpipe.paths import cache_dir

    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".doctor-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return Check("cache", "fail", f"{folder} is not writable ({exc.strerror or exc})", "set $PEERPIPE_CACHE to a writable folder")
    results = sorted((folder / "bench").glob("*.json")) if (folder / "bench").is_dir() else []
    if not results:
        return Check("cache", "ok", f"{folder}: no benchmarks yet (the first room measures this machine)")
    age_days = (time.time() - max(p.stat().st_mtime for p in results)) / 86400
    return Check("cache", "ok", f"{folder}: {len(results)} benchmark file(s), newest {age_days:.1f} days old")


def address_check(host: str) -> Check:
    if host.startswith("127."):
        return Check(
            "address", "warn", f"{host}: loopback only, so only rooms on this machine",
            "connect to a network, or pass --listen with this machine's LAN address",
        )
    return Check("address", "ok", f"{host} (members on other machines reach this one there)")


def port_check(host: str, port: int) -> Check:
    where = f"{host}:{port}" if port else host
    try:
        with socket.create_server((host, port)) as server:
            bound = server.getsockname()[1]
            with socket.create_connection((host, bound), timeout=3):
                pass
    except OSError as exc:
        return Check(
            "port", "fail", f"cannot listen on {where}: {exc.strerror or exc}",
            "pick another --listen port, or allow it through the firewall",
        )
    return Check("port", "ok", f"{host}:{port or bound} accepts connections (a local connect)")


def mdns_check(host: str) -> Check:
    from peerpipe.room import DiscoveryError

    try:
        took = asyncio.run(_mdns_round_trip(host))
    except (DiscoveryError, OSError) as exc:
        return Check("mdns", "warn", f"on {host}: {exc}", "members find the host with --peer HOST:PORT instead of the code alone")
    return Check("mdns", "ok", f"a probe advertised on {host} was found in {took * 1e3:.0f} ms")


async def _mdns_round_trip(host: str) -> float:
    import secrets

    from peerpipe.room import Advertiser, find_host

    nameplate = 90000 + secrets.randbelow(9999)  # outside the codes rooms use
    began = time.monotonic()
    async with Advertiser(nameplate, host, 9, secrets.token_hex(16)):
        await find_host(nameplate, 5.0, host)
    return time.monotonic() - began


def http_check(host: str, port: int) -> Check:
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        return Check(
            "http", "warn", f"{host}:{port} is not free ({exc.strerror or exc})",
            "serve the API elsewhere with --http HOST:PORT (or --http off)",
        )
    return Check("http", "ok", f"{host}:{port} is free for the API and dashboard")


def model_check(model: Path, device: str | None) -> Check:
    from peerpipe.cluster.capabilities import default_dtype, detect
    from peerpipe.cluster.model_choice import ModelChoice
    from peerpipe.errors import PeerpipeError

    try:
        caps = detect(device)
    except (RuntimeError, ValueError, PeerpipeError):
        caps = detect("cpu")  # (the device check says what is wrong with it; the model is checked still)
    try:
        dtype = default_dtype(caps.kind, caps.supports_bf16)
        choice = ModelChoice.from_dir(model, dtype)
        from peerpipe.engine.loader import check_model_dir

        check_model_dir(model)
    except PeerpipeError as exc:
        return Check("model", "fail", str(exc), "point --model at a complete model that peerpipe loads (docs/models.md)")
    need = choice.spec.total_weight_bytes
    detail = f"{choice.model_id}: {choice.config.n_layers} layers, {need / GiB:.2f} GiB in {dtype}"
    if need > caps.memory_free_bytes:
        return Check(
            "model", "warn", f"{detail}; this device has {caps.memory_free_bytes / GiB:.1f} GiB free",
            f"pool more machines: `peerpipe plan --model {model} --node NAME:mem=GB,tflops=X` shows a split that fits",
        )
    return Check("model", "ok", f"{detail}; fits this device alone")


def webgpu_check() -> Check:
    from peerpipe.cluster.capabilities import wgpu_adapter

    name = wgpu_adapter()
    if not name or name.startswith("unavailable"):
        return Check("webgpu", "warn", name or "the wgpu extra is not installed", "pip install 'peerpipe[wgpu]', and a Vulkan driver")
    return Check("webgpu", "ok", name)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
