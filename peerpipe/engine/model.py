"""A contiguous range of decoder layers of a Llama-family model: one pipeline stage.

The first stage owns the token embedding, the last owns the final norm and LM head. One
``forward`` serves prefill and decode; positions are explicit and keys/values go to a
preallocated :class:`KVCache`. The q/k/v and gate/up projections are fused into single matrices
at load time, which halves the kernels a decode step launches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peerpipe.engine import attention_cuda, cpu_layout, int8_gluon
from peerpipe.engine.bf16_gluon import launching_is_free
from peerpipe.engine.config import ModelConfig
from peerpipe.engine.kvcache import Batch, KeysValues, KVCache
from peerpipe.engine.normed import normed_linear, rms_norm
from peerpipe.engine.quant import (
    INT4_GROUP,
    KEEP_GROUP,
    Int8Weight,
    QuantWeight,
    check_mode,
    linear,
    quantize,
)
from peerpipe.engine.rope import rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


# The modules below only hold parameters, so checkpoints load by name; the forward pass runs on
# plain tensors gathered once into a `LayerWeights` per layer, because nn.Module call and
# attribute overhead is a large share of a small model's decode step on a CPU.


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wqkv = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def linears(self) -> dict[str, nn.Linear]:
        """The layer's four matrices, by the names quantization modes use."""
        return {"wqkv": self.attn.wqkv, "wo": self.attn.wo, "w_gate_up": self.mlp.w_gate_up, "w_down": self.mlp.w_down}


class LayerWeights(NamedTuple):
    attn_norm: Tensor
    wqkv: Tensor | QuantWeight
    bqkv: Tensor | None
    wo: Tensor | QuantWeight
    bo: Tensor | None
    q_norm: Tensor | None
    k_norm: Tensor | None
    mlp_norm: Tensor
    w_gate_up: Tensor | QuantWeight
    b_gate_up: Tensor | None
    w_down: Tensor | QuantWeight
    b_down: Tensor | None
    window: int | None

    @classmethod
    def of(cls, block: Block, window: int | None) -> LayerWeights:
        attn, mlp = block.attn, block.mlp
        qk_norm = hasattr(attn, "q_norm")
        return cls(
            attn_norm=block.attn_norm.weight,
            wqkv=attn.wqkv.weight,
            bqkv=attn.wqkv.bias,
            wo=attn.wo.weight,
            bo=attn.wo.bias,
            q_norm=attn.q_norm.weight if qk_norm else None,
            k_norm=attn.k_norm.weight if qk_norm else None,
            mlp_norm=block.mlp_norm.weight,
            w_gate_up=mlp.w_gate_up.weight,
            b_gate_up=mlp.w_gate_up.bias,
            w_down=mlp.w_down.weight,
            b_down=mlp.w_down.bias,
            window=window,
        )


def layer_forward(
    cfg: ModelConfig,
    w: LayerWeights,
    x: Tensor,
    rope: Tensor,
    mask: Tensor | None,
    store: Tensor,
    reads: KeysValues | None,
    batch: Batch,
    delta: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoder layer on the residual stream ``x + delta``. Returns the stream as ``(x, delta)``
    with the MLP's output not yet added: the next layer adds it where it normalizes (in its
    q|k|v product's kernel for a decode step's row on CUDA, graphed or compiled, normed.py; in
    the norm's kernel elsewhere when compiled); :meth:`Stage.forward` adds the last one."""
    # Written for few dispatches per layer (a decode step of a small model is mostly dispatch
    # overhead on a CPU): views and in-place updates of the fused q|k|v output, no indexing.
    b, s, _ = x.shape
    h, kvh, d, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    x, qkv = normed_linear(x, delta, w.attn_norm, eps, w.wqkv, w.bqkv)
    qkv = qkv.view(b, s, h + 2 * kvh, d)
    if w.q_norm is not None and w.k_norm is not None:
        qk = qkv.narrow(2, 0, h + kvh)
        qk.copy_(torch.cat((rms_norm(qk[:, :, :h], w.q_norm, eps), rms_norm(qk[:, :, h:], w.k_norm, eps)), 2))
    if mask is None or (s == 1 and attention_cuda.fits_step(qkv, rope, store, h) and launching_is_free()):
        # Rotation, cache write and attention in one kernel, reading scattered slots in place (no
        # mask: Stage.forward builds none when every layer goes this way).
        attn = attention_cuda.decode_step(
            qkv, rope, store, batch.slots, batch.positions, batch.kv_len, h, w.window or 0, d**-0.5,
            -1 if batch.slot_start is None else batch.slot_start,
        ).reshape(b, 1, cfg.q_size)
    else:
        attn = _attention(cfg, qkv, rope, mask, store, reads, batch)
    x, act = normed_linear(x, linear(attn, w.wo, w.bo), w.mlp_norm, eps, w.w_gate_up, w.b_gate_up, glu=True)
    return x, linear(act, w.w_down, w.b_down)


def _attention(
    cfg: ModelConfig, qkv: Tensor, rope: Tensor, mask: Tensor, store: Tensor, reads: KeysValues | None, batch: Batch
) -> Tensor:
    """Rotate the new queries and keys ``qkv`` ``[B, S, H + 2 KV, D]``, store keys and values in
    the cache, attend: ``[B, S, H*D]``."""
    b, s, _, _ = qkv.shape
    h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qk = qkv.narrow(2, 0, h + kvh)
    if torch.compiler.is_compiling():
        # Out of place, so Inductor computes the rotation where it stores keys and reads queries
        # instead of writing it back into the projection first.
        qkv = torch.cat((_rotated(qk, rope), qkv.narrow(2, h + kvh, kvh)), 2)
    else:
        _apply_rope(qk, rope)

    batch.write(store, qkv.narrow(2, h, 2 * kvh).view(b, s, 2, kvh, d))
    if torch.compiler.is_compiling() and reads is not None:
        # Views made outside a compiled function read the cache as it was before the write above.
        reads = batch.views(store)
    # [B, KV, L, D]; views of `store` see what was just written, scattered rows are gathered now.
    keys, values = reads if reads is not None else batch.gather(store)
    if s == 1:
        # One new token: each KV head's group of query heads attends as G query rows, so SDPA
        # needs no grouped-query expansion of the keys; [B, KV, G, D] is [B, 1, H*D] in memory.
        q = qkv.narrow(2, 0, h).view(b, kvh, h // kvh, d)
        if attention_cuda.fits(q, keys, values, mask) and launching_is_free():
            attn = attention_cuda.decode_attention(q, keys, values, mask, d**-0.5)  # one kernel, not 3
        elif torch.compiler.is_compiling():
            # Spelled out, Inductor fuses the mask and softmax into a short kernel chain: on an
            # H200 7.9 us against SDPA's 11.8 for 512 cached positions, 13.8 against 33.9 for 2048.
            scores = torch.matmul(q, keys.transpose(-1, -2)).float().mul_(d**-0.5).add_(mask)
            # Probabilities in the model's dtype before the product, as flash attention does.
            attn = torch.matmul(scores.softmax(-1).to(qkv.dtype), values)
        else:
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=d**-0.5)
        return attn.reshape(b, 1, cfg.q_size)
    grouped = kvh != h
    if grouped and qkv.is_cuda:
        # Memory-efficient attention takes a mask but not grouped heads, and with cuDNN's off
        # (new_cache) grouped heads under a mask would fall to the math kernel: four times slower
        # over 4000 positions, and their scores held whole. Expanded heads cost a copy.
        keys, values = keys.repeat_interleave(h // kvh, 1), values.repeat_interleave(h // kvh, 1)
        grouped = False
    return (
        F.scaled_dot_product_attention(
            qkv.narrow(2, 0, h).transpose(1, 2),
            keys,
            values,
            attn_mask=mask,
            scale=d**-0.5,
            enable_gqa=grouped,
        )
        .transpose(1, 2)
        .reshape(b, s, cfg.q_size)
    )  # [B, H, S, D] -> [B, S, H*D]


def _apply_rope(qk: Tensor, rope: Tensor) -> None:
    """Rotate queries and keys in place by the complex factors ``rope`` ``[B, S, 1, D/2]``.

    The loader stores each head's q/k dimensions interleaved (pairs (i, i + D/2) side by side),
    so the rotation is one complex multiply instead of slicing halves. Attention scores do not
    change: q and k are permuted alike and a dot product ignores the order of its terms.
    """
    if qk.dtype == torch.float32:
        torch.view_as_complex(qk.unflatten(-1, (-1, 2))).mul_(rope)
        return
    # Half precision has no complex type: rotate in float32 and write back.
    rotated = torch.view_as_complex(qk.float().unflatten(-1, (-1, 2))) * rope
    qk.copy_(torch.view_as_real(rotated).flatten(-2))


def _rotated(qk: Tensor, rope: Tensor) -> Tensor:
    """``qk`` rotated as :func:`_apply_rope` does, into a new tensor, in real arithmetic:
    Inductor generates no code for complex numbers."""
    cos_sin = torch.view_as_real(rope)
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    x = qk.float().unflatten(-1, (-1, 2))
    even, odd = x[..., 0], x[..., 1]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2).to(qk.dtype)


def interleave_rope_dims(t: Tensor, head_dim: int) -> Tensor:
    """Reorder each head's dimensions from HF's halves layout to interleaved pairs (dim 0)."""
    half = head_dim // 2
    order = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()
    heads = t.reshape(-1, head_dim, *t.shape[1:])
    return heads.index_select(1, order.to(t.device)).reshape(t.shape)


LayerFn = Callable[
    [ModelConfig, LayerWeights, Tensor, Tensor, Tensor | None, Tensor, KeysValues | None, Batch, Tensor | None],
    tuple[Tensor, Tensor],
]


class LayerRange:
    """Layers ``[start, end)`` of a model: what a stage's users ask of its place, on any backend
    (this torch stage, or webgpu/stage.py's)."""

    cfg: ModelConfig
    start: int
    end: int

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.cfg.n_layers

    @property
    def n_layers(self) -> int:
        return self.end - self.start


class Stage(LayerRange, nn.Module):
    """Layers ``[start, end)`` of a model; build it on the meta device and load it with ``assign``."""

    def __init__(self, cfg: ModelConfig, start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start < end <= cfg.n_layers:
            raise ValueError(f"stage [{start}, {end}) is not a non-empty range of 0..{cfg.n_layers}")
        self.cfg, self.start, self.end = cfg, start, end
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if self.is_first else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(start, end))
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: Tensor | None = None  # [positions, D/2] complex rotation factors
        self._weights: list[LayerWeights] = []
        self.quant_mode = "none"  # how the layers' matrices are held (engine/quant.py)
        self._quant: list[dict[str, QuantWeight]] = []
        # The LM head in int8 (on CUDA, where the decode kernel reads it at twice bf16's speed);
        # with tied embeddings on a whole-model stage it also serves the embedding's rows.
        self._head: QuantWeight | None = None
        self._embed_from_head = False

    def setup_rope(self, max_seq: int) -> None:
        """Precompute the rotations for positions ``0 .. max_seq`` on the stage's device."""
        device = next(self.parameters()).device
        inv_freq = rope_inv_freq(self.cfg.rope, self.cfg.head_dim).to(device)
        pos = torch.arange(max_seq, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        self.rope = torch.polar(torch.ones_like(freqs), freqs)

    def quantize(self, mode: str, each: list[dict[str, str]] | None = None) -> None:
        """Hold the layers' matrices in ``mode`` (int8, int4; none leaves them), or with ``each``
        (``keep``) every layer's matrices in their own modes, by name (wqkv, wo, w_gate_up,
        w_down): the full-precision matrices are freed, so the stage takes the memory of its new
        precision."""
        if mode == "keep":
            if each is None or len(each) != len(self.layers):
                raise ValueError("keep needs a mode for every matrix of every layer")
        elif check_mode(mode) == "none" or mode == self.quant_mode:  # one mode for every matrix
            return
        if self.quant_mode != "none":
            raise ValueError(f"this stage is already held in {self.quant_mode}")
        for i, block in enumerate(self.layers):
            linears = block.linears()
            modes = each[i] if each is not None else dict.fromkeys(linears, mode)
            keep = mode == "keep"  # the file's 32-value blocks, their zero points as they are
            group = KEEP_GROUP if keep else INT4_GROUP
            held = {n: quantize(lin.weight, modes[n], group, exact_zero=keep) for n, lin in linears.items()}
            self._quant.append({n: q for n, q in held.items() if not isinstance(q, Tensor)})
            for name, lin in linears.items():
                if name in self._quant[-1]:
                    lin.weight = nn.Parameter(lin.weight.new_empty(0), requires_grad=False)
        self.quant_mode = mode
        device = self.layers[0].mlp_norm.weight.device if len(self.layers) else torch.device("cpu")
        if device.type == "cuda" and mode in ("int8", "keep"):
            int8_gluon.reserve(device)  # before any graph is captured
        if device.type == "cuda" and mode == "int8" and self.is_last:
            self._quantize_head()
        self._gather_weights()

    def _quantize_head(self) -> None:
        head = self.lm_head.weight
        tied = self.embed is not None and self.embed.weight.data_ptr() == head.data_ptr()
        self._head = quantize(head, "int8")
        self.lm_head.weight = nn.Parameter(head.new_empty(0), requires_grad=False)
        if tied and self.embed is not None:
            self.embed.weight = nn.Parameter(head.new_empty(0), requires_grad=False)
            self._embed_from_head = True

    def lay_out_for_cpu(self) -> int:
        """Store this stage's wide fp32 matrices by columns where it runs on a CPU, for one-row
        products (cpu_layout.py); returns how many were."""
        linears = [m for b in self.layers for m in b.linears().values()]
        if self.is_last and self._head is None:
            linears.append(self.lm_head)
        tied = (self.embed, self.lm_head) if self.embed is not None and self.is_last else None
        count = cpu_layout.lay_out(linears, tied)
        if count:
            self._gather_weights()
        return count

    def _gather_weights(self) -> None:
        windows = self.cfg.windows[self.start : self.end]
        weights = [LayerWeights.of(b, w) for b, w in zip(self.layers, windows, strict=True)]
        if self._quant:
            weights = [w._replace(**q) for w, q in zip(weights, self._quant, strict=True)]
        self._weights = weights

    def new_cache(self, max_slots: int, max_seq: int) -> KVCache:
        """A KV cache for this stage; also readies the stage to run (RoPE tables, weight lists)."""
        param = next(self.parameters())
        if param.device.type == "cuda":
            # cuDNN's attention plans every new shape first: 75-1200 ms for each batch or prompt
            # length not seen before (an H200, Llama-3-8B's layers), where every request brings a
            # new length. The other kernels need no plan.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self._gather_weights()
        if self.rope is None or self.rope.shape[0] < max_seq + 1:
            self.setup_rope(max_seq + 1)
        return KVCache(
            self.n_layers,
            max_slots,
            max_seq,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            param.dtype,
            param.device,
        )

    def forward(
        self,
        x: Tensor,
        cache: KVCache,
        batch: Batch,
        last_only: bool = False,
        layer_fn: LayerFn | None = None,
        graphed: bool = False,
    ) -> Tensor:
        """Token ids ``[B, S]`` (first stage) or hidden states ``[B, S, H]`` in; hidden states or,
        on the last stage, logits ``[B, S, V]`` out (``[B, 1, V]`` with ``last_only``).

        ``layer_fn`` replaces :func:`layer_forward`, e.g. by a compiled version of it. ``graphed``:
        the call is captured into a CUDA graph, or warms one up (cuda_graphs.py)."""
        layer_fn = layer_fn or layer_forward
        if self.is_first:
            x = self._embed_rows(x) if self._embed_from_head else self.embed(x)
        assert self.rope is not None, "call new_cache() first"
        rope = self.rope[batch.positions].unsqueeze(2)
        cfg = self.cfg
        # A graphed decode step's layers attend in attention_cuda.decode_step, which needs no
        # masks (it knows each row's position): five kernels fewer a step. Its warm-up runs go
        # the same way, so a compiled layer sees one kind of call.
        stepping = (
            graphed and batch.positions.shape[1] == 1
            and attention_cuda.takes(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cache.kv.dtype, cache.device)
        )
        masks = {} if stepping else _masks(batch, self.cfg.windows[self.start : self.end], x.dtype)
        delta = None
        for w, store, reads in zip(self._weights, cache.layers, cache.reads(batch), strict=True):
            x, delta = layer_fn(cfg, w, x, rope, masks.get(w.window), store, reads, batch, delta)
        if delta is not None:
            x = x + delta
        if not self.is_last:
            return x
        if last_only:
            x = x[:, -1:]
        return linear(rms_norm(x, self.norm.weight, cfg.rms_norm_eps), self._head or self.lm_head.weight)

    def _embed_rows(self, ids: Tensor) -> Tensor:
        head = self._head
        assert isinstance(head, Int8Weight)
        return head.q[ids].to(head.scale.dtype) * head.scale[ids].unsqueeze(-1)


def _masks(batch: Batch, windows: tuple[int | None, ...], dtype: torch.dtype) -> dict[int | None, Tensor]:
    """Additive masks ``[B, 1, S, L]``, one per distinct sliding window among the stage's layers."""
    return {w: _mask(batch, w, dtype) for w in set(windows)}


def _mask(batch: Batch, window: int | None, dtype: torch.dtype) -> Tensor:
    q_pos = batch.positions[:, :, None]
    k_pos = torch.arange(batch.kv_len, device=q_pos.device)[None, None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
    return mask.masked_fill_(~allowed, float("-inf"))[:, None]
