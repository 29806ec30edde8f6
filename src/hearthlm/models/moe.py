"""Mixture-of-experts decoders: Qwen3-MoE and Mixtral. The Llama block with its MLP swapped for a router and
stacked experts (layers/moe.py: routing rules, expert layouts, the per-token sum order); attention, norms and
everything else are Llama's. Blocks without a router (Qwen3-MoE's mlp_only_layers and those off its
decoder_sparse_step; a GGUF block without ffn_gate_inp) keep Llama's dense MLP.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kernels.kv_quant import KVPool
from ..layers.activation import gated_act
from ..layers.moe import MoE
from .llama import LlamaLayer, LlamaModel, WeightGetter


class MoeLayer(LlamaLayer):
    native_cls = None  # the native CPU kernel and the fused GPU blocks fuse Llama's dense MLP only
    fused_cls = None
    compiles = False  # --compile traces Llama's dense projections

    def init_mlp(self, get: WeightGetter, p: str) -> None:
        cfg = self.cfg
        self.moe = None
        if self.idx not in cfg.dense_layers:
            self.moe = MoE.load(get, p, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                                cfg.hidden_act, round_weights=cfg.architecture == "qwen3_moe")
        if self.moe is None:
            super().init_mlp(get, p)
        else:
            self.gate_up = self.down = None

    @classmethod
    def fusable(cls, cfg: ModelConfig) -> bool:
        return False

    def forward(self, h: torch.Tensor, residual: None, meta, kv_cache: tuple[KVPool, KVPool]
                ) -> tuple[torch.Tensor, None]:
        h = torch.add(h, self.o.native_dtype(self.attend(self.norm(h, self.input_norm), meta, kv_cache)))
        x = self.norm(h, self.post_attn_norm)
        if self.moe is None:
            return torch.add(h, self.down.native_dtype(gated_act(self.gate_up(x), self.cfg.hidden_act))), None
        return torch.add(h, self.moe(x)), None


class MoeModel(LlamaModel):
    layer_cls = MoeLayer

    def weight_tensors(self) -> list[torch.Tensor]:
        return super().weight_tensors() + [t for layer in self.layers if layer.moe is not None
                                           for t in layer.moe.tensors()]
