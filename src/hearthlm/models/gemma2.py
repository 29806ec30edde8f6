"""Gemma 2: pre- and post-norms around attention and MLP, (1 + w) RMSNorm, GeGLU, scaled embeddings,
attention and final logit soft-capping, alternating sliding-window / global layers."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..layers.attention import AttentionMetadata
from .llama import LlamaLayer, LlamaModel, WeightGetter, require


class Gemma2Layer(LlamaLayer):
    gemma = True

    def __init__(self, cfg: ModelConfig, idx: int, get: WeightGetter):
        super().__init__(cfg, idx, get)
        p = f"model.layers.{idx}."
        self.pre_ffn_norm = require(get, p + "pre_feedforward_layernorm.weight")
        self.post_ffn_norm = require(get, p + "post_feedforward_layernorm.weight")

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                 kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a = self.attention(self.norm(h, self.input_norm), cos, sin, meta, kv_cache)
        h = h + self.norm(a, self.post_attn_norm)
        m = self.mlp(self.norm(h, self.pre_ffn_norm))
        return h + self.norm(m, self.post_ffn_norm)


class Gemma2Model(LlamaModel):
    layer_cls = Gemma2Layer
