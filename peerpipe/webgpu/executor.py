"""Where WebGPU work runs: buffers, the kernels of ``kernels.wgsl`` and command submission.

A stage never touches a GPU API directly; it speaks to an ``Executor``: make a buffer, write
bytes into it, run a list of dispatches and read some buffers back. ``LocalExecutor`` does that
with ``wgpu`` on this machine's adapter; the browser node does the same in JavaScript
(``static/executor.js``) with the same WGSL, so one stage program drives both.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from peerpipe.errors import PeerpipeError


class WebGPUError(PeerpipeError):
    """WebGPU is missing, finds no adapter, or a kernel failed."""


@dataclass(frozen=True)
class Dispatch:
    kernel: str  # an entry point of kernels.wgsl
    buffers: tuple[int, ...]  # bound as bindings 0, 1, … in order
    groups: tuple[int, int, int]


def kernel_source(weight_type: str) -> str:
    """The WGSL module for weights stored as ``weight_type`` (f32 or f16)."""
    body = resources.files("peerpipe.webgpu").joinpath("kernels.wgsl").read_text()
    return prelude(weight_type) + body


def prelude(weight_type: str) -> str:
    if weight_type == "f16":
        return "enable f16;\nalias WT = f16;\n"
    if weight_type == "f32":
        return "alias WT = f32;\n"
    raise ValueError(f"unknown weight type {weight_type!r}: f32 or f16")


class Executor(Protocol):
    # The module dispatches compile against (f32 or f16 weights): a stage sets its own before it runs.
    weight_type: str

    @property
    def name(self) -> str: ...
    @property
    def has_f16(self) -> bool: ...
    @property
    def remote(self) -> bool:
        """Whether work waits on a network (a browser tab) rather than on this machine's GPU."""
        ...
    @property
    def max_binding(self) -> int:
        """The largest buffer a kernel may bind, in bytes."""
        ...

    def buffer(self, size: int) -> int: ...
    def free(self, buffers: list[int]) -> None: ...
    def write(self, buffer: int, data: bytes | memoryview, offset: int = 0) -> None: ...
    def run(self, dispatches: list[Dispatch], reads: list[tuple[int, int]]) -> list[bytes]:
        """Run ``dispatches`` in order, then read ``(buffer, bytes)`` from the start of each."""
        ...

    def close(self) -> None: ...


_adapter_lock = threading.Lock()


def _adapter() -> Any:
    try:
        import wgpu  # type: ignore[import-not-found]
    except ImportError as exc:
        raise WebGPUError("--device webgpu needs the wgpu package: pip install 'peerpipe[wgpu]'") from exc
    with _adapter_lock:
        try:
            adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
        except Exception as exc:  # wgpu raises plain errors when no Vulkan/Metal/D3D12 driver is there
            raise WebGPUError(f"no WebGPU adapter: {exc}") from exc
    if adapter is None:
        raise WebGPUError("no WebGPU adapter (is a Vulkan, Metal or D3D12 driver installed?)")
    return adapter


class LocalExecutor:
    """This machine's WebGPU adapter, through ``wgpu``."""

    remote = False

    def __init__(self) -> None:
        import wgpu  # type: ignore[import-not-found]

        self._wgpu = wgpu
        adapter = _adapter()
        info = adapter.info
        self.name = f"{info.get('device', '?')} ({info.get('backend_type', '?')})"
        self.has_f16 = "shader-f16" in adapter.features
        limits = {
            key: adapter.limits[key]
            for key in ("max-storage-buffer-binding-size", "max-buffer-size", "max-storage-buffers-per-shader-stage")
        }
        features = ["shader-f16"] if self.has_f16 else []
        self.max_binding = int(limits["max-storage-buffer-binding-size"])
        self.device = adapter.request_device_sync(required_features=features, required_limits=limits)
        self._modules: dict[str, Any] = {}
        self._pipelines: dict[tuple[str, str], Any] = {}
        self._groups: dict[tuple[str, str, tuple[int, ...]], Any] = {}
        self._buffers: list[Any] = []
        self.weight_type = "f32"
        self._usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC

    def buffer(self, size: int) -> int:
        if size > self.max_binding:
            raise WebGPUError(f"a buffer of {size / 1e6:.0f} MB is larger than this adapter binds "
                              f"({self.max_binding / 1e6:.0f} MB)")
        # Sizes are rounded up to 16 bytes: a vec4 read of a buffer's tail must stay inside it.
        self._buffers.append(self.device.create_buffer(size=max(16, -(-size // 16) * 16), usage=self._usage))
        return len(self._buffers) - 1

    def free(self, buffers: list[int]) -> None:
        """Give buffers back (a stage or cache that is dropped); their ids are not reused."""
        gone = set(buffers)
        for b in gone:
            if b < len(self._buffers) and self._buffers[b] is not None:
                self._buffers[b].destroy()
                self._buffers[b] = None
        self._groups = {k: g for k, g in self._groups.items() if not gone.intersection(k[2])}

    def write(self, buffer: int, data: bytes | memoryview, offset: int = 0) -> None:
        if len(data):
            self.device.queue.write_buffer(self._buffers[buffer], offset, data)

    def _pipeline(self, kernel: str) -> Any:
        key = (self.weight_type, kernel)
        pipeline = self._pipelines.get(key)
        if pipeline is None:
            module = self._modules.get(self.weight_type)
            if module is None:
                module = self.device.create_shader_module(code=kernel_source(self.weight_type))
                self._modules[self.weight_type] = module
            pipeline = self.device.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": kernel})
            self._pipelines[key] = pipeline
        return pipeline

    def _group(self, d: Dispatch) -> Any:
        key = (self.weight_type, d.kernel, d.buffers)
        group = self._groups.get(key)
        if group is None:
            pipeline = self._pipeline(d.kernel)
            entries = [
                {"binding": i, "resource": {"buffer": self._buffers[b], "offset": 0, "size": self._buffers[b].size}}
                for i, b in enumerate(d.buffers)
            ]
            group = self.device.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries)
            self._groups[key] = group
        return group

    def run(self, dispatches: list[Dispatch], reads: list[tuple[int, int]]) -> list[bytes]:
        encoder = self.device.create_command_encoder()
        compute = encoder.begin_compute_pass()
        for d in dispatches:
            compute.set_pipeline(self._pipeline(d.kernel))
            compute.set_bind_group(0, self._group(d))
            compute.dispatch_workgroups(*d.groups)
        compute.end()
        self.device.queue.submit([encoder.finish()])
        return [bytes(self.device.queue.read_buffer(self._buffers[b], 0, size)) for b, size in reads]

    def close(self) -> None:
        for buffer in self._buffers:
            if buffer is not None:
                buffer.destroy()
        self._buffers.clear()
        self._groups.clear()
