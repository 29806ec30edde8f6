"""Gemma 2: pre- and post-norms around attention and MLP, (1 + w) RMSNorm, GeGLU, scaled embeddings,
attention and final logit soft-capping, alternating sliding-window / global layers."""
from __future__ import annotations

import torch

from .. import kernels as K
from ..config import ModelConfig
from ..kernels.kv_quant import KVPool
from ..layers.norm import rms_norm
from .llama import LlamaLayer, LlamaModel, WeightGetter, require


class Gemma2Layer(LlamaLayer):
    native_cls = None  # the native kernel fuses Llama's SiLU block only
    compiles = False  # its attention's compiled rounding differs from eager's in the last bits

    def __init__(self, cfg: ModelConfig, idx: int, get: WeightGetter):
        super().__init__(cfg, idx, get)
        p = f"model.layers.{idx}."
        self.pre_ffn_norm = require(get, p + "pre_feedforward_layernorm.weight")
        self.post_ffn_norm = require(get, p + "post_feedforward_layernorm.weight")

    @classmethod
    def fusable(cls, cfg: ModelConfig) -> bool:
        return cfg.hidden_act in ("gelu_pytorch_tanh", "gelu_tanh")

    def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, w, self.cfg.rms_norm_eps, gemma=True)

    def forward(self, h: torch.Tensor, residual: None, meta, kv_cache: tuple[KVPool, KVPool]
                ) -> tuple[torch.Tensor, None]:
        a = self.attention(self.norm(h, self.input_norm), meta, kv_cache)
        h = h + self.norm(a, self.post_attn_norm)
        m = self.mlp(self.norm(h, self.pre_ffn_norm))
        return h + self.norm(m, self.post_ffn_norm), None


class FusedGemma2Layer(Gemma2Layer):
    """Gemma 2 on the fused GPU kernels: (1 + w) RMSNorm kernels (the pre-norms add the residual in the same
    launch), FusedLlamaLayer's q/k/v + RoPE + K/V write + attention, GeGLU in one kernel; activations stay in the
    model dtype (no int8 GEMV inputs)."""

    def _norm(self, x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None):
        return K.rms_norm(x, w, self.cfg.rms_norm_eps, residual, weight_offset=1.0, gemma_style=True)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, meta, kv_cache: tuple[KVPool, KVPool]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self._norm(h, self.input_norm), h
        else:
            x, residual = self._norm(h, self.input_norm, residual)
        a = self.o(self.fused_attention(x, None, meta, kv_cache))
        x, residual = self._norm(self._norm(a, self.post_attn_norm), self.pre_ffn_norm, residual)
        m = self.down(K.gelu_tanh_and_mul(self.gate_up(x)))
        return self._norm(m, self.post_ffn_norm), residual

    def add_norm(self, h: torch.Tensor, w: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._norm(h, w, residual)[0]


Gemma2Layer.fused_cls = FusedGemma2Layer


class Gemma2Model(LlamaModel):
    layer_cls = Gemma2Layer
