"""Phi-3 / Phi-4-mini: Llama's block with fused checkpoint weights, split at load time into the names LlamaLayer
takes (so the layer code and kernels stay one path): `self_attn.qkv_proj` rows are q | k | v, `mlp.gate_up_proj`
rows are gate | up. LongRoPE ("longrope" / "su") is a rope_scaling kind of kernels/rope.py."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from .llama import LlamaModel, WeightGetter


def split_fused(cfg: ModelConfig, get: WeightGetter) -> WeightGetter:
    """`get` for LlamaLayer's names over a checkpoint holding Phi-3's fused ones (unfused names pass through)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    parts = {"self_attn.q_proj.": ("self_attn.qkv_proj.", 0, q), "self_attn.k_proj.": ("self_attn.qkv_proj.", q, kv),
             "self_attn.v_proj.": ("self_attn.qkv_proj.", q + kv, kv),
             "mlp.gate_proj.": ("mlp.gate_up_proj.", 0, cfg.intermediate_size),
             "mlp.up_proj.": ("mlp.gate_up_proj.", cfg.intermediate_size, cfg.intermediate_size)}

    last = {"self_attn.v_proj.", "mlp.up_proj."}
    held: dict[str, torch.Tensor | None] = {}  # a fused tensor, read once, kept until its last part is taken

    def fused_get(name: str) -> torch.Tensor | None:
        for part, (fused, start, rows) in parts.items():
            if part in name:
                fname = name.replace(part, fused)
                w = held.pop(fname) if fname in held else get(fname)
                if w is None:
                    return get(name)
                if part not in last:
                    held[fname] = w
                return w[start:start + rows].contiguous()  # its own storage: the fused tensor is freed
        return get(name)

    return fused_get


class Phi3Model(LlamaModel):
    def __init__(self, cfg: ModelConfig, get: WeightGetter, device: torch.device, **kw) -> None:
        super().__init__(cfg, split_fused(cfg, get), device, **kw)
