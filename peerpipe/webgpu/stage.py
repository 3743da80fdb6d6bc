"""A pipeline stage computed with WebGPU: layers ``[start, end)`` with their weights and KV cache
in GPU buffers, one submit per forward, only hidden states (or logits) read back.

``WebGPUStage`` answers what ``StageServer`` and ``LocalEngine`` ask of a torch ``Stage``
(``is_first``, ``new_cache``, calling it with a ``Batch``), so a WebGPU node serves like any
other. The sequence of dispatches per layer mirrors ``engine/model.layer_forward``: RMSNorm,
fused q|k|v, q/k norms, RoPE, cache write, attention, o-projection added to the residual,
RMSNorm, fused gate|up, SwiGLU, down-projection added to the residual.
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from peerpipe.engine.config import ModelConfig
from peerpipe.engine.kvcache import Batch, KVCache
from peerpipe.engine.model import LayerRange, Stage
from peerpipe.engine.rope import rope_inv_freq
from peerpipe.webgpu.executor import Dispatch, Executor, WebGPUError

MM_ROWS = 8  # rows one matmul workgroup takes (kernels.wgsl)
SCRATCH_BYTES = 64 << 20  # attention scores of one forward; larger prompts go in several forwards


def _u32(*values: int | float) -> bytes:
    out = []
    for v in values:
        out.append(struct.unpack("<I", struct.pack("<f", v))[0] if isinstance(v, float) else int(v))
    return struct.pack(f"<{len(out)}I", *out)


def _groups(count: int, size: int) -> int:
    return -(-count // size)


@dataclass
class _Layer:
    attn_norm: int
    wqkv: int
    bqkv: int
    wo: int
    bo: int
    q_norm: int
    k_norm: int
    mlp_norm: int
    w_gate_up: int
    b_gate_up: int
    w_down: int
    b_down: int
    params: dict[str, int]  # kernel constants, one buffer per dispatch kind


class GpuKVCache(KVCache):
    """The torch cache's bookkeeping (slots, lengths, rollback) over keys and values kept in GPU
    buffers, one per layer: ``[slots, positions + 1, 2, kv_heads, head_dim]`` f32."""

    def __init__(self, gpu: Executor, n_layers: int, max_slots: int, max_seq: int, kv_heads: int, head_dim: int) -> None:
        super().__init__(0, max_slots, max_seq, kv_heads, head_dim, torch.float32, "cpu")
        self.positions = max_seq + 1
        per_layer = max_slots * self.positions * 2 * kv_heads * head_dim * 4
        self.buffers = [gpu.buffer(per_layer) for _ in range(n_layers)]
        self._nbytes = per_layer * n_layers
        weakref.finalize(self, gpu.free, list(self.buffers))  # a dropped cache gives its memory back

    @property
    def nbytes(self) -> int:
        return self._nbytes


class WebGPUStage(LayerRange):
    """Layers ``[start, end)`` on an ``Executor``; build it with :meth:`from_torch`."""

    def __init__(self, gpu: Executor, cfg: ModelConfig, start: int, end: int, weight_type: str) -> None:
        self.gpu, self.cfg, self.start, self.end = gpu, cfg, start, end
        self.weight_type = weight_type
        self.remote = gpu.remote  # a browser's: each forward waits on the network
        self.quant_mode = "none"
        self._layers: list[_Layer] = []
        self._embed = self._norm = self._head = -1
        self._programs: dict[tuple[int, int, bool], list[Dispatch]] = {}
        self._cache: GpuKVCache | None = None
        self.nbytes = 0
        self._owned: list[int] = []  # every buffer of this stage, given back when it is dropped
        weakref.finalize(self, gpu.free, self._owned)

    # -- what a torch Stage answers ------------------------------------------------------------
    def parameters(self) -> Iterator[torch.Tensor]:
        """What a stage server reads its dtype from: hidden states cross in f32."""
        yield torch.empty(0, dtype=torch.float32)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, gpu: Executor, stage: Stage, weight_type: str | None = None) -> WebGPUStage:
        """Copy a torch stage's weights (as the loader laid them out: fused, RoPE-interleaved)
        into GPU buffers: its matrices in ``weight_type`` (f16 where the adapter has it)."""
        if stage.quant_mode != "none":
            raise WebGPUError("a WebGPU stage holds f32 or f16 weights, not int8/int4 (--quantize none)")
        wt = weight_type or ("f16" if gpu.has_f16 else "f32")
        if wt == "f16" and not gpu.has_f16:
            raise WebGPUError(f"{gpu.name} has no shader-f16: use float32 weights")
        self = cls(gpu, stage.cfg, stage.start, stage.end, wt)
        cfg = stage.cfg
        dummy = self._upload(torch.zeros(4), "f32")
        if stage.is_first:
            self._embed = self._upload(stage.embed.weight, wt)
        stage._gather_weights()
        for w in stage._weights:
            self._layers.append(_Layer(
                attn_norm=self._upload(w.attn_norm, "f32"),
                wqkv=self._upload(w.wqkv, wt),
                bqkv=self._upload(w.bqkv, "f32") if w.bqkv is not None else dummy,
                wo=self._upload(w.wo, wt),
                bo=self._upload(w.bo, "f32") if w.bo is not None else dummy,
                q_norm=self._upload(w.q_norm, "f32") if w.q_norm is not None else dummy,
                k_norm=self._upload(w.k_norm, "f32") if w.k_norm is not None else dummy,
                mlp_norm=self._upload(w.mlp_norm, "f32"),
                w_gate_up=self._upload(w.w_gate_up, wt),
                b_gate_up=self._upload(w.b_gate_up, "f32") if w.b_gate_up is not None else dummy,
                w_down=self._upload(w.w_down, wt),
                b_down=self._upload(w.b_down, "f32") if w.b_down is not None else dummy,
                params={},
            ))
            self._layers[-1].params["window"] = w.window or 0
            self._layers[-1].params["has_bias"] = int(w.bqkv is not None) | int(w.bo is not None) << 1 | int(
                w.b_gate_up is not None
            ) << 2 | int(w.b_down is not None) << 3
        if stage.is_last:
            self._norm = self._upload(stage.norm.weight, "f32")
            self._head = self._upload(stage.lm_head.weight, wt)
        self._dummy = dummy
        if cfg.hidden_size % 4 or cfg.q_size % 4 or cfg.intermediate_size % 4:
            raise WebGPUError(f"{cfg.shape_key}: WebGPU kernels need widths that are multiples of 4")
        return self

    def _upload(self, t: torch.Tensor, wt: str) -> int:
        data = t.detach().to("cpu", torch.float16 if wt == "f16" else torch.float32).contiguous()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        buffer = self._new(len(raw))
        self.gpu.write(buffer, raw)
        self.nbytes += len(raw)
        return buffer

    def _new(self, size: int) -> int:
        buffer = self.gpu.buffer(size)
        self._owned.append(buffer)
        return buffer

    def new_cache(self, max_slots: int, max_seq: int) -> GpuKVCache:
        """A cache in GPU buffers, and the stage's activation buffers sized for it."""
        cfg = self.cfg
        cache = GpuKVCache(self.gpu, self.n_layers, max_slots, max_seq, cfg.n_kv_heads, cfg.head_dim)
        self._setup(cache)
        return cache

    def _setup(self, cache: GpuKVCache) -> None:
        cfg = self.cfg
        h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        per_row = h * cache.positions * 4
        self.max_rows = max(1, min(64, SCRATCH_BYTES // per_row))
        rows = self.max_rows
        width = (h + 2 * kvh) * d
        self._x = self._new(rows * cfg.hidden_size * 4)
        self._xn = self._new(rows * cfg.hidden_size * 4)
        self._qkv = self._new(rows * width * 4)
        self._att = self._new(rows * cfg.q_size * 4)
        self._gu = self._new(rows * 2 * cfg.intermediate_size * 4)
        self._act = self._new(rows * cfg.intermediate_size * 4)
        self._scores = self._new(rows * per_row)
        self._ids = self._new(rows * 4)
        self._step = self._new((4 + 3 * rows) * 4)
        self._sel = self._new(rows * cfg.hidden_size * 4)
        self._logits = self._new(rows * cfg.vocab_size * 4) if self.is_last else -1
        inv = rope_inv_freq(cfg.rope, d)
        freqs = torch.arange(cache.positions, dtype=torch.float32)[:, None] * inv[None, :]
        self._rope = self._upload(torch.stack((freqs.cos(), freqs.sin()), -1), "f32")
        eps = float(cfg.rms_norm_eps)
        const = lambda *v: self._const(_u32(*v))  # noqa: E731
        self._p_norm = const(cfg.hidden_size, eps, 0)
        self._p_norm_sel = const(cfg.hidden_size, eps, 1)
        self._p_embed = const(cfg.hidden_size, 0)
        self._p_head = const(cfg.vocab_size, cfg.hidden_size, 0, 0, 1)
        self._p_gather = const(cfg.hidden_size, rows)
        self._p_silu = const(cfg.intermediate_size)
        self._p_rope = const(h, kvh, d, width)
        self._p_kv = const(h, kvh, d, width, cache.positions)
        self._p_headnorm = const(h, kvh, d, eps, width)
        for layer in self._layers:
            bias = layer.params["has_bias"]
            layer.params.update(
                qkv=const(width, cfg.hidden_size, bias & 1, 0, 0),
                o=const(cfg.hidden_size, cfg.q_size, bias >> 1 & 1, 1, 0),
                gate_up=const(2 * cfg.intermediate_size, cfg.hidden_size, bias >> 2 & 1, 0, 0),
                down=const(cfg.hidden_size, cfg.intermediate_size, bias >> 3 & 1, 1, 0),
                attn=const(h, kvh, d, width, cache.positions, layer.params["window"], d**-0.5, cache.positions),
            )
        self._programs.clear()
        self._cache = cache

    def _const(self, raw: bytes) -> int:
        buffer = self._new(len(raw))
        self.gpu.write(buffer, raw)
        return buffer

    # -- running -------------------------------------------------------------------------------
    def _program(self, rows: int, selected: int, head: bool) -> list[Dispatch]:
        key = (rows, selected, head)
        program = self._programs.get(key)
        if program is not None:
            return program
        cfg, cache = self.cfg, self._cache
        assert cache is not None, "call new_cache() first"
        h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        width = (h + 2 * kvh) * d
        step, x, xn = self._step, self._x, self._xn
        tiles = _groups(rows, MM_ROWS)

        def mm(p: int, src: int, w: int, b: int, dst: int, out: int, tile_rows: int = tiles) -> Dispatch:
            return Dispatch("matmul", (p, step, src, w, b, dst), (min(out, 32768), _groups(out, 32768), tile_rows))

        program = []
        if self.is_first:
            program.append(Dispatch("embed", (self._p_embed, step, self._ids, self._embed, x), (_groups(hidden, 256), rows, 1)))
        for i, layer in enumerate(self._layers):
            p, kv = layer.params, cache.buffers[i]
            program += [
                Dispatch("rmsnorm", (self._p_norm, step, x, layer.attn_norm, xn), (rows, 1, 1)),
                mm(p["qkv"], xn, layer.wqkv, layer.bqkv, self._qkv, width),
            ]
            if cfg.qk_norm:
                program.append(Dispatch("headnorm", (self._p_headnorm, step, self._qkv, layer.q_norm, layer.k_norm),
                                        (h + kvh, rows, 1)))
            program += [
                Dispatch("rope", (self._p_rope, step, self._qkv, self._rope), (_groups((h + kvh) * d // 2, 64), rows, 1)),
                Dispatch("kv_write", (self._p_kv, step, self._qkv, kv), (_groups(2 * kvh * d, 64), rows, 1)),
                Dispatch("attention", (p["attn"], step, self._qkv, kv, self._scores, self._att), (h, rows, 1)),
                mm(p["o"], self._att, layer.wo, layer.bo, x, hidden),
                Dispatch("rmsnorm", (self._p_norm, step, x, layer.mlp_norm, xn), (rows, 1, 1)),
                mm(p["gate_up"], xn, layer.w_gate_up, layer.b_gate_up, self._gu, 2 * inter),
                Dispatch("silu_mul", (self._p_silu, step, self._gu, self._act), (_groups(inter, 256), rows, 1)),
                mm(p["down"], self._act, layer.w_down, layer.b_down, x, hidden),
            ]
        if head:
            program += [
                Dispatch("gather_rows", (self._p_gather, step, x, self._sel), (_groups(hidden, 256), selected, 1)),
                Dispatch("rmsnorm", (self._p_norm_sel, step, self._sel, self._norm, xn), (selected, 1, 1)),
                mm(self._p_head, xn, self._head, self._dummy, self._logits, cfg.vocab_size, _groups(selected, MM_ROWS)),
            ]
        self._programs[key] = program
        return program

    def __call__(self, x: torch.Tensor, cache: KVCache, batch: Batch, last_only: bool = False) -> torch.Tensor:
        return self.forward(x, cache, batch, last_only)

    def forward(self, x: torch.Tensor, cache: KVCache, batch: Batch, last_only: bool = False) -> torch.Tensor:
        """Token ids ``[B, S]`` (first stage) or hidden states ``[B, S, H]`` in; hidden states or,
        on the last stage, logits ``[B, S, V]`` (``[B, 1, V]`` with ``last_only``) out, on the CPU."""
        if cache is not self._cache:
            raise WebGPUError("this WebGPU stage runs only with the cache it made (new_cache)")
        b, s = x.shape[0], x.shape[1]
        slots = batch.slot_ids or tuple(int(v) for v in batch.slots.tolist())
        positions = batch.positions.cpu().tolist()
        chunk = max(1, self.max_rows // b)
        if b > self.max_rows:
            raise WebGPUError(f"a forward of {b} sessions; this stage takes {self.max_rows} at once")
        outs = []
        for s0 in range(0, s, chunk):
            s1 = min(s, s0 + chunk)
            final = s1 == s
            outs.append(self._run(x[:, s0:s1], slots, [row[s0:s1] for row in positions], last_only, final))
        out = [o for o in outs if o is not None]
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def _run(self, x: torch.Tensor, slots: tuple[int, ...], positions: list[list[int]], last_only: bool,
             final: bool) -> torch.Tensor | None:
        cfg = self.cfg
        b, s = x.shape[0], x.shape[1]
        rows = b * s
        head = self.is_last and (final or not last_only)
        selected = [r * s + s - 1 for r in range(b)] if last_only else list(range(rows))
        rowinfo = [v for r in range(b) for p in positions[r] for v in (slots[r], p)]
        step = _u32(rows, len(selected) if head else 0, 0, 0, *rowinfo)
        sel_at = (4 + 2 * self.max_rows) * 4
        self.gpu.write(self._step, step)
        self.gpu.write(self._step, _u32(*selected), sel_at)
        if self.is_first:
            ids = x.reshape(-1).to(torch.int32).numpy().tobytes()
            self.gpu.write(self._ids, ids)
        else:
            self.gpu.write(self._x, x.reshape(rows, cfg.hidden_size).to(torch.float32).contiguous().numpy().tobytes())
        program = self._program(rows, len(selected), head)
        if self.gpu.weight_type != self.weight_type:  # the executor last ran another stage's module
            self.gpu.weight_type = self.weight_type
        if head:
            (raw,) = self.gpu.run(program, [(self._logits, len(selected) * cfg.vocab_size * 4)])
            out = torch.frombuffer(bytearray(raw), dtype=torch.float32)
            return out.view(b, -1, cfg.vocab_size)
        if self.is_last:  # a prompt's earlier chunk: its logits are not wanted
            self.gpu.run(program, [])
            return None
        (raw,) = self.gpu.run(program, [(self._x, rows * cfg.hidden_size * 4)])
        return torch.frombuffer(bytearray(raw), dtype=torch.float32).view(b, s, cfg.hidden_size)
