"""Load a stage onto this machine's WebGPU adapter: read it as the torch loader does (fused,
RoPE-interleaved, on the CPU), then copy it into GPU buffers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from peerpipe.engine.config import ModelConfig
from peerpipe.engine.loader import LoadStats, ProgressFn, load_stage
from peerpipe.webgpu.executor import Executor, LocalExecutor, WebGPUError
from peerpipe.webgpu.stage import WebGPUStage

_shared: LocalExecutor | None = None
_lock = threading.Lock()


def local_executor() -> LocalExecutor:
    """One WebGPU device per process: every stage and benchmark of this node shares it."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = LocalExecutor()
        return _shared


_remote: dict[str, Executor] = {}


def register_executor(device: str, gpu: Executor | None) -> None:
    """Name a browser tab's executor ``webgpu:NAME`` so a node with that device runs on it
    (None forgets it)."""
    if not device.startswith("webgpu:"):
        raise ValueError(f"a WebGPU device is named webgpu:NAME, not {device!r}")
    if gpu is None:
        _remote.pop(device, None)
    else:
        _remote[device] = gpu


def executor_for(device: str) -> Executor:
    if device == "webgpu":
        return local_executor()
    gpu = _remote.get(device)
    if gpu is None:
        raise WebGPUError(f"no WebGPU device {device!r} here (a browser node that left?)")
    return gpu


def weight_type(dtype: str | None, gpu: Executor) -> str:
    """How the matrices are stored: f16 for a half-precision dtype where the adapter has
    shader-f16 (bf16 weights are rounded to f16), else f32."""
    if dtype in (None, "float16", "bfloat16"):
        return "f16" if gpu.has_f16 else "f32"
    if dtype == "float32":
        return "f32"
    raise WebGPUError(f"WebGPU stages hold float32 or float16 weights, not {dtype}")


def load_webgpu_stage(
    path: str | Path,
    start: int = 0,
    end: int | None = None,
    *,
    dtype: str | None = None,
    progress: ProgressFn | None = None,
    cfg: ModelConfig | None = None,
    quantize: str = "none",
    device: str = "webgpu",
) -> tuple[WebGPUStage, LoadStats]:
    if quantize not in ("none", "auto"):
        raise WebGPUError(f"--quantize {quantize} needs a torch device; a WebGPU node holds f32 or f16 weights")
    gpu = executor_for(device)
    wt = weight_type(dtype, gpu)
    stage, stats = load_stage(path, start, end, device="cpu", dtype="float32", progress=progress, cfg=cfg)
    return WebGPUStage.from_torch(gpu, stage, wt), stats


def adapter_facts(device: str = "webgpu") -> dict[str, Any]:
    """The adapter's name, kind (DiscreteGPU, IntegratedGPU, CPU, browser…), whether it has f16
    and, for a browser, the memory it offers."""
    from peerpipe.webgpu.executor import _adapter

    if device != "webgpu":
        from peerpipe.webgpu.remote import RemoteExecutor

        gpu = executor_for(device)
        facts = gpu.session.facts if isinstance(gpu, RemoteExecutor) else {}
        return {"name": gpu.name, "type": "browser", "f16": gpu.has_f16, "memory": int(facts.get("memory") or 1 << 30)}

    adapter = _adapter()
    info = adapter.info
    return {
        "name": f"{info.get('device', '?')} ({info.get('backend_type', '?')})",
        "type": str(info.get("adapter_type", "")),
        "f16": "shader-f16" in adapter.features,
    }
