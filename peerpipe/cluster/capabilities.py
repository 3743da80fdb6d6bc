"""What the local device is: kind, name, memory, half-precision support, CPU cores and RAM.

Only reads what the OS and PyTorch report; measuring speed is ``benchmark``'s job.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

KINDS = ("cuda", "rocm", "mps", "xpu", "cpu")


@dataclass(frozen=True)
class DeviceCaps:
    kind: str  # cuda, rocm, mps, xpu, cpu or webgpu
    torch_device: str  # what to pass to torch, e.g. "cuda:0" ("webgpu": the stage runs WGSL, not torch)
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    supports_f16: bool  # fast half-precision math
    supports_bf16: bool
    cpu_cores: int
    ram_total_bytes: int
    ram_free_bytes: int
    wgpu_adapter: str = ""  # the WebGPU adapter, when the optional wgpu extra is installed
    gpu: str = ""  # the GPU's own id (CUDA's UUID): processes on one GPU take turns on it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def memory_info() -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    with contextlib.suppress(OSError, ValueError):
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
        return fields["MemTotal"], fields.get("MemAvailable", fields["MemFree"])
    with contextlib.suppress(ValueError, OSError, AttributeError):
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    return 0, 0


def cpu_cores() -> int:
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_mask() -> str:
    """The cores this process may run on, as a hex bit mask ("3": cores 0 and 1); "" where the
    system does not say, or past 256 cores (the record's limit)."""
    with contextlib.suppress(AttributeError):
        mask = f"{sum(1 << core for core in os.sched_getaffinity(0)):x}"
        return mask if len(mask) <= 64 else ""
    return ""


def _cpu_name_and_flags() -> tuple[str, set[str]]:
    name, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not name:
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    return name or platform.processor() or platform.machine() or "cpu", flags


def wgpu_adapter() -> str:
    """The WebGPU adapter's description, or "" when wgpu is not installed or finds none.

    Only commands that are asked about WebGPU call this: the probe starts a Vulkan loader, which
    prints its own complaints (``XDG_RUNTIME_DIR is invalid``) on the process's stderr; those are
    silenced here, since a missing adapter is answered in words."""
    try:
        import wgpu  # type: ignore[import-not-found]
    except ImportError:
        return ""
    with _quiet_stderr():
        try:
            adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
            info = adapter.info
            return f"{info.get('device', '?')} ({info.get('backend_type', '?')})"
        except Exception as exc:  # a broken driver must not stop detection of everything else
            return f"unavailable: {type(exc).__name__}"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block: native libraries write there directly."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_device(device: str | None) -> Any:
    """``device`` as a torch device (None for the best one present); an unknown or absent
    device is a clear error. The engine has no xpu path, the benchmarks do: xpu is taken as is."""
    if not device:
        return None
    if device == "webgpu":  # WGSL stages through wgpu: there must be an adapter
        from peerpipe.webgpu.load import adapter_facts

        with _quiet_stderr():
            adapter_facts()
        return None
    if device.startswith("webgpu:"):
        from peerpipe.errors import PeerpipeError

        raise PeerpipeError(f"{device!r} names a browser node; a machine's own adapter is --device webgpu")
    if device.startswith("xpu"):
        import torch

        return torch.device(device)
    from peerpipe.engine.loader import resolve_device

    return resolve_device(device)


def default_dtype(kind: str, supports_bf16: bool = True) -> str:
    """What a device loads weights in when not told: CPUs run float32 fastest and exactly,
    accelerators want half precision."""
    if kind == "cpu":
        return "float32"
    return "bfloat16" if supports_bf16 else "float16"


def detect(device: str | None = None, *, webgpu: bool = False) -> DeviceCaps:
    """Capabilities of ``device`` (a torch device string) or of the best accelerator present;
    with ``webgpu``, also the WebGPU adapter's name."""
    import torch

    ram_total, ram_free = memory_info()
    cores = cpu_cores()
    if device and (device == "webgpu" or device.startswith("webgpu:")):
        return _webgpu_caps(device, cores, ram_total, ram_free)
    wgpu_name = wgpu_adapter() if webgpu else ""
    requested = check_device(device)
    kind = requested.type if requested else _best_kind(torch)
    if kind == "cuda" and torch.cuda.is_available():
        index = requested.index if requested and requested.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return DeviceCaps(
            "rocm" if torch.version.hip else "cuda",
            f"cuda:{index}",
            torch.cuda.get_device_name(index),
            total,
            free,
            True,
            torch.cuda.is_bf16_supported(),
            cores,
            ram_total,
            ram_free,
            wgpu_name,
            str(getattr(torch.cuda.get_device_properties(index), "uuid", "")),
        )
    if kind == "mps" and torch.backends.mps.is_available():
        total = int(getattr(torch.mps, "recommended_max_memory", lambda: ram_total)())
        used = int(getattr(torch.mps, "driver_allocated_memory", lambda: 0)())
        return DeviceCaps(
            "mps", "mps", "Apple GPU", total, max(0, total - used), True, True, cores, ram_total, ram_free, wgpu_name
        )
    xpu = getattr(torch, "xpu", None)
    if kind == "xpu" and xpu is not None and xpu.is_available():
        props = xpu.get_device_properties(0)
        total = int(props.total_memory)
        return DeviceCaps("xpu", "xpu:0", props.name, total, total, True, True, cores, ram_total, ram_free, wgpu_name)
    name, flags = _cpu_name_and_flags()
    return DeviceCaps(
        "cpu",
        "cpu",
        name,
        ram_total,
        ram_free,
        supports_f16=bool(flags & {"avx512_fp16", "amx_fp16", "asimdhp", "fphp"}),
        supports_bf16=bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}),
        cpu_cores=cores,
        ram_total_bytes=ram_total,
        ram_free_bytes=ram_free,
        wgpu_adapter=wgpu_name,
    )


# WebGPU does not tell how much memory an adapter has. One that shares the machine's RAM offers
# half of what is free; a discrete one offers this much unless --memory-gb says otherwise.
WEBGPU_DISCRETE_BYTES = 8 << 30


def _webgpu_caps(device: str, cores: int, ram_total: int, ram_free: int) -> DeviceCaps:
    from peerpipe.webgpu.load import adapter_facts

    with _quiet_stderr():
        facts = adapter_facts(device)
    shared = facts["type"] in ("CPU", "IntegratedGPU", "")
    memory = ram_free // 2 if shared else int(facts.get("memory", WEBGPU_DISCRETE_BYTES))
    if facts["type"] == "browser":  # the tab's machine, not this one
        cores, ram_total, ram_free = 0, memory, memory
    return DeviceCaps(
        "webgpu", device, facts["name"], ram_total // 2 if shared else memory, memory, bool(facts["f16"]), False,
        cores, ram_total, ram_free, facts["name"],
    )


def _best_kind(torch: Any) -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    return "cpu"
