"""Gemma 3 text: Gemma 2's block ((1 + w) RMSNorm, pre- and post-norms around attention and MLP, GeGLU, scaled
embeddings) with a (1 + w) RMSNorm per q/k head, soft-capping only where the config sets it, and local
(sliding-window) layers beside global ones, each kind with its own RoPE.

RoPE: the global layers take the step's cos/sin (meta.cos / meta.sin from model.rotary: rope_theta with the
config's rope_scaling); the local layers take model.local_rotary's (rope_local_theta, unscaled), computed once per
step by the first local layer that reads them and kept on the step's metadata. The native CPU blocks do the same
for the local KV group's RowAttention (the backend prepares the global cos/sin for every group), and the fused GPU
blocks read one cos|sin table per layer kind (Gemma3Model.build_rope_tables)."""
from __future__ import annotations

import functools

import torch

from .. import kernels as K
from ..config import ModelConfig
from ..kernels.kv_quant import KVPool
from ..layers.activation import gated_act
from ..layers.attention import paged_attention
from ..layers.rotary import Rotary, apply_rotary
from .gemma2 import FusedGemma2Layer, Gemma2Layer, Gemma2Model
from .llama import WeightGetter


class Gemma3Layer(Gemma2Layer):
    """The reference forward (Gemma2Layer.forward) with q/k norms and the RoPE of this layer's kind."""

    def __init__(self, cfg: ModelConfig, idx: int, get: WeightGetter):
        super().__init__(cfg, idx, get)  # cfg.qk_norm: q_norm / k_norm read there
        self.local = cfg.layer_windows[idx] is not None
        self.local_rotary: Rotary | None = None  # local layers: the local RoPE on this block's device (the model's)
        self.rope_table: torch.Tensor | None = None  # fused blocks: this kind's cos|sin table (the model's)

    def cos_sin(self, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos, sin for this layer's kind: [num_tokens, 1, head_dim] each."""
        if not self.local:
            return meta.cos, meta.sin
        cs = meta.__dict__.get("gemma3_local_cos_sin")
        if cs is None:
            cs = meta.gemma3_local_cos_sin = self.local_rotary.cos_sin(meta.positions, meta.cos.dtype)
        return cs

    def attend(self, h: torch.Tensor, meta, kv_cache: tuple[KVPool, KVPool]) -> torch.Tensor:
        # h: [num_tokens, hidden] -> [num_tokens, heads * head_dim]
        q, k, v = self.project_qkv(h)
        cos, sin = self.cos_sin(meta)
        q, k = apply_rotary(self.norm(q, self.q_norm), cos, sin), apply_rotary(self.norm(k, self.k_norm), cos, sin)
        return self._attend(q, k, v, meta, kv_cache)

    def attend_qkv(self, qkv: torch.Tensor, meta, kv_cache: tuple[KVPool, KVPool]) -> torch.Tensor:
        """LlamaLayer.attend_qkv with this layer's RoPE (q/k norms applied)."""
        cfg, n = self.cfg, qkv.shape[0]
        cos, sin = self.cos_sin(meta)
        qk = apply_rotary(qkv[:, :self.q_size + self.kv_size].view(n, -1, cfg.head_dim), cos, sin)
        q, k = qk[:, :cfg.num_heads], qk[:, cfg.num_heads:]
        v = qkv[:, self.q_size + self.kv_size:].view(n, cfg.num_kv_heads, cfg.head_dim)
        return self._attend(q, k, v, meta, kv_cache)

    @functools.cached_property
    def native(self) -> bool:
        """Whether every projection runs the native CPU kernel (NativeGemma3Layer): bias-free projections and
        float32 norms."""
        lins = (self.qkv, self.o, self.gate_up, self.down)
        norms = (self.input_norm, self.post_attn_norm, self.pre_ffn_norm, self.post_ffn_norm, self.q_norm, self.k_norm)
        return self.native_cls is not None and self.cfg.hidden_act in ("gelu_pytorch_tanh", "gelu_tanh") and \
            all(lin.native is not None and lin.bias is None for lin in lins) and \
            all(w.dtype == torch.float32 for w in norms)


class NativeGemma3Layer(Gemma3Layer):
    """The native CPU kernel's matmuls, the input and pre-FFN norms fused into the q/k/v and gate/up calls (as
    w' = 1 + w, Gemma's (1 + w) norm in float32), RoPE, K/V writes and attention in one native call per layer
    (kernels/cpu_quant.RowAttention); the q/k norms, post-norms and GeGLU run in torch between the calls. h (float32)
    is updated in place."""

    @functools.cached_property
    def shifted_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (1.0 + self.input_norm.float()).contiguous(), (1.0 + self.pre_ffn_norm.float()).contiguous()

    def row_attention(self, meta):
        """The native attention of this layer's KV group for the step with this layer's RoPE (None: the step runs
        the reference attention)."""
        g = meta.layer_group[self.idx]
        gm = meta.groups[g]
        if not self.local or gm.row_attention is None:
            return gm.row_attention
        key = f"gemma3_row_attention_{g}"
        att = meta.__dict__.get(key)
        if att is None:
            from ..kernels.cpu_quant import RowAttention

            cfg = self.cfg
            cos, sin = self.cos_sin(meta)
            att = RowAttention(cos, sin, gm.slot_mapping, *gm.rows, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                               cfg.attn_scale, cfg.attn_logit_softcapping, lib=self.qkv.native.lib)
            setattr(meta, key, att)
        return att

    def forward(self, h: torch.Tensor, residual: None, meta, kv_cache: tuple[KVPool, KVPool]
                ) -> tuple[torch.Tensor, None]:
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        w_in, w_ffn = self.shifted_norms
        if not h.is_contiguous():
            h = h.contiguous()
        qkv = self.qkv.native.run(h, norm=(w_in, eps))
        n, d = qkv.shape[0], cfg.head_dim
        q = qkv[:, :self.q_size].view(n, -1, d)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(n, -1, d)
        q.copy_(self.norm(q, self.q_norm))
        k.copy_(self.norm(k, self.k_norm))
        att = self.row_attention(meta)
        o = att(qkv, *kv_cache) if att is not None else self.attend_qkv(qkv, meta, kv_cache)
        h.add_(self.norm(self.o.native.run(o), self.post_attn_norm))
        gate_up = self.gate_up.native.run(h, norm=(w_ffn, eps))
        m = self.down.native.run(gated_act(gate_up, cfg.hidden_act))
        return h.add_(self.norm(m, self.post_ffn_norm)), None


class FusedGemma3Layer(Gemma3Layer, FusedGemma2Layer):
    """FusedGemma2Layer's block; attention takes the (1 + w) q/k norms as norm kernels (the RoPE kernel's fused
    norm rounds like Qwen3's, not like Gemma's), then the RoPE kernel with this kind's table, writing K/V too."""

    forward = FusedGemma2Layer.forward
    add_norm = FusedGemma2Layer.add_norm

    def fused_attention(self, x: torch.Tensor, xa, meta, kv_cache: tuple[KVPool, KVPool]) -> torch.Tensor:
        # x: [num_tokens, hidden] -> [num_tokens, heads * head_dim]
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        q, k, v = self.project_qkv(x, xa)
        q = K.rms_norm(q, self.q_norm, eps, weight_offset=1.0, gemma_style=True)
        k = K.rms_norm(k, self.k_norm, eps, weight_offset=1.0, gemma_style=True)
        kc, vc = kv_cache
        write = (v, kc, vc, meta.groups[meta.layer_group[self.idx]].slot_mapping) \
            if K.can_fuse_kv_write(kc, vc) else None
        K.apply_rope_(q, k, meta.positions, self.rope_table, None, write)
        o = paged_attention(q, k, v, kv_cache, meta, self.idx, cfg.attn_scale, cfg.attn_logit_softcapping,
                            kv_written=write is not None)
        return o.reshape(x.shape[0], self.q_size)


Gemma3Layer.native_cls, Gemma3Layer.fused_cls = NativeGemma3Layer, FusedGemma3Layer


class Gemma3Model(Gemma2Model):
    layer_cls = Gemma3Layer

    def __init__(self, cfg: ModelConfig, get: WeightGetter, device: torch.device,
                 freq_factors: torch.Tensor | None = None, placement=None):
        super().__init__(cfg, get, device, freq_factors, placement)
        theta = getattr(cfg, "rope_local_theta", 10000.0)  # loader/hf_config.Gemma3Config
        self.local_rotary = Rotary(cfg.head_dim, theta, None, device)
        host = Rotary(cfg.head_dim, theta, None, self.placement.host) if self.placement.offloaded else None
        for i, layer in enumerate(self.layers):
            layer.local_rotary = host if self.placement.on_host(i) else self.local_rotary
        if self.cos_sin is not None:
            self.build_rope_tables(cfg.max_position_embeddings)

    def build_rope_tables(self, max_pos: int) -> None:
        """The fused blocks' cos|sin tables ([max_pos, head_dim] float32 each): the global one is self.cos_sin
        (built here when missing), the local one rope_local_theta's; each layer keeps its kind's."""
        cfg = self.cfg
        if self.cos_sin is None or self.cos_sin.shape[0] != max_pos:
            self.cos_sin = K.build_cos_sin_cache(cfg.head_dim, max_pos, cfg.rope_theta, cfg.rope_scaling,
                                                 device=self.device)
        local = K.build_cos_sin_cache(cfg.head_dim, max_pos, getattr(cfg, "rope_local_theta", 10000.0),
                                      device=self.device)
        for layer in self.layers:
            layer.rope_table = local if layer.local else self.cos_sin
