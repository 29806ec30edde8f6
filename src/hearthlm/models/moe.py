"""Mixture-of-experts decoders: Qwen3-MoE and Mixtral. The Llama block with its MLP swapped for a router and
stacked experts; attention, norms and everything else are Llama's.

Rules (as HF transformers computes them):
- routing in float32: softmax over the experts' logits, the top k (ties: the lower expert id), renormalized to
  sum to 1 where the config says (Mixtral always, Qwen3-MoE with norm_topk_prob);
- each chosen expert computes down(SiLU(gate(x)) * up(x)), weighted by its routing weight;
- a token's output sums its experts in increasing expert id, whatever else is in the batch.
Experts run with torch matmuls on the tokens routed to them; quantized experts (GGUF, --quantization) are
dequantized at load to the model's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels.kv_quant import KVPool
from ..layers.activation import gated_act
from .llama import LlamaLayer, LlamaModel, WeightGetter, require


def _dense(w: object, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a plain tensor: quantized containers (GroupQuant, ...) dequantized."""
    if isinstance(w, torch.Tensor):
        return w
    return w.dequantize(dtype)


class MoeLayer(LlamaLayer):
    native_cls = None  # the native CPU kernel and the fused GPU blocks fuse Llama's dense MLP only
    fused_cls = None

    def init_mlp(self, get: WeightGetter, p: str) -> None:
        cfg = self.cfg
        self.router = None
        router, base, names = None, p + "mlp.", ("gate_proj", "up_proj", "down_proj")
        if self.idx not in cfg.dense_layers:
            router = get(p + "block_sparse_moe.gate.weight")
            if router is not None:  # Mixtral names: w1 gate, w3 up, w2 down
                base, names = p + "block_sparse_moe.", ("w1", "w3", "w2")
            else:
                router = get(base + "gate.weight")
        if router is None:  # a dense block (mlp_only_layers; a GGUF block without a router)
            super().init_mlp(get, p)
            return
        self.gate_up = self.down = None
        dtype = router.dtype
        self.router = _dense(router, dtype)
        ex = [[_dense(require(get, f"{base}experts.{e}.{n}.weight"), dtype) for n in names]
              for e in range(cfg.num_experts)]
        self.w13 = torch.stack([torch.cat([g, u]) for g, u, _ in ex])  # [E, 2I, H]: gate rows, then up rows
        self.w2 = torch.stack([d for _, _, d in ex])  # [E, H, I]

    @classmethod
    def fusable(cls, cfg: ModelConfig) -> bool:
        return False

    def experts(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H], the routed experts' weighted sum (the module's rules)."""
        cfg = self.cfg
        logits = F.linear(x, self.router)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():  # increasing expert id: a token's sum in a fixed order
            tok, rank = torch.where(ids == e)
            y = F.linear(gated_act(F.linear(x[tok], self.w13[e]), cfg.hidden_act), self.w2[e])
            out.index_add_(0, tok, y * weights[tok, rank, None])
        return out

    def forward(self, h: torch.Tensor, residual: None, meta, kv_cache: tuple[KVPool, KVPool]
                ) -> tuple[torch.Tensor, None]:
        h = torch.add(h, self.o.native_dtype(self.attend(self.norm(h, self.input_norm), meta, kv_cache)))
        x = self.norm(h, self.post_attn_norm)
        if self.router is None:
            return torch.add(h, self.down.native_dtype(gated_act(self.gate_up(x), self.cfg.hidden_act))), None
        return torch.add(h, self.experts(x)), None


class MoeModel(LlamaModel):
    layer_cls = MoeLayer
