"""Phi-3 / Phi-4-mini: Llama's block with fused checkpoint weights, split at load time into the names LlamaLayer
takes (so the layer code and kernels stay one path): `self_attn.qkv_proj` rows are q | k | v, `mlp.gate_up_proj`
rows are gate | up. LongRoPE ("longrope" / "su") is a rope_scaling kind of kernels/rope.py."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import UnsupportedModelError
from ..kernels.rope import rope_attention_factor
from .llama import LlamaModel, WeightGetter


def split_fused(cfg: ModelConfig, get: WeightGetter) -> WeightGetter:
    """`get` for LlamaLayer's names over a checkpoint holding Phi-3's fused ones (unfused names pass through)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    parts = {"self_attn.q_proj.": ("self_attn.qkv_proj.", 0, q), "self_attn.k_proj.": ("self_attn.qkv_proj.", q, kv),
             "self_attn.v_proj.": ("self_attn.qkv_proj.", q + kv, kv),
             "mlp.gate_proj.": ("mlp.gate_up_proj.", 0, cfg.intermediate_size),
             "mlp.up_proj.": ("mlp.gate_up_proj.", cfg.intermediate_size, cfg.intermediate_size)}

    rotary_dim = (cfg.rope_scaling or {}).get("rotary_dim") or cfg.head_dim
    factor = rope_attention_factor(cfg.rope_scaling)
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
                w = w[start:start + rows]
                if part in ("self_attn.q_proj.", "self_attn.k_proj.") and rotary_dim < cfg.head_dim:
                    if not isinstance(w, torch.Tensor):
                        raise UnsupportedModelError("partial rotary (Phi-4-mini) reorders q/k rows of float weights "
                                                    "only: load the model without --quantization")
                    w = partial_rotary_rows(w, cfg.head_dim, rotary_dim, factor)
                return w.contiguous()  # its own storage: the fused tensor is freed
        return get(name)

    return fused_get


def partial_rotary_rows(w: torch.Tensor, head_dim: int, rotary_dim: int, factor: float) -> torch.Tensor:
    """Partial rotary on the full-head kernels: each head's rows [r1 | r2 | p] (HF rotates r1|r2, passes p through)
    reordered to [r1 | p1 | r2 | p2], whose pairs (i, i + head_dim / 2) are r's; rope_inv_freq gives p's pairs
    frequency 0. q and k take the same order, so q.k is unchanged. The cos/sin attention factor (LongRoPE) also
    multiplies p there, so p's rows are divided by it."""
    r, p = rotary_dim // 2, (head_dim - rotary_dim) // 2
    order = torch.cat([torch.arange(0, r), torch.arange(2 * r, 2 * r + p), torch.arange(r, 2 * r),
                       torch.arange(2 * r + p, head_dim)])
    h = w.reshape(-1, head_dim, *w.shape[1:])[:, order]
    if factor != 1.0:
        h = h.clone()
        h[:, r:r + p] /= factor
        h[:, 2 * r + p:] /= factor
    return h.reshape(w.shape)


class Phi3Model(LlamaModel):
    def __init__(self, cfg: ModelConfig, get: WeightGetter, device: torch.device, **kw) -> None:
        super().__init__(cfg, split_fused(cfg, get), device, **kw)
