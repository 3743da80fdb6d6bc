"""WebGPU stages: WGSL kernels (kernels.wgsl) run by wgpu here or by a browser tab (api/static)."""

from peerpipe.webgpu.executor import Dispatch, Executor, LocalExecutor, WebGPUError
from peerpipe.webgpu.stage import GpuKVCache, WebGPUStage

__all__ = ["Dispatch", "Executor", "GpuKVCache", "LocalExecutor", "WebGPUError", "WebGPUStage"]
