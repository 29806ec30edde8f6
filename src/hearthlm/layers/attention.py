"""Paged attention: write new K/V through the slot mapping, attend over each sequence's cached context.

`paged_attention` is the layers' one entry point: it runs the step's backend (runtime/backends/: Triton kernels,
this torch reference, the native CPU kernel), whose metadata the runner built for the step. The torch reference
below runs one attention per sub-batch (decodes together, prefills together) so that no compute is spent on
padding between them. Prefill sub-batches gather each sequence's keys into a padded batch for one masked SDPA.
Decode sub-batches (one query per sequence) skip SDPA, whose CPU kernel is slow for single queries: the keys are
gathered per kv head for one batched matmul with the query heads that share them, and the values are never copied:
a float32 pool is read in place by embedding_bag, each head's output being its probability-weighted sum of value
rows (`_decode_attention`). A layer's KV pool is a tensor, or a QuantizedKVCache (--kv-cache-dtype fp8|int8):
quantized on write, dequantized on read (the reference right after the gather, the kernels in registers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.kv_quant import KVPool, QuantizedKVCache, gather_rows, write_pool


@dataclass
class CpuPlan:
    """A sub-batch's per-step index work, built with the step's metadata (runtime/backends/torch_ref.py) and
    read by every layer of its group."""

    slots: torch.Tensor  # [B * L] flat key slots (padded-batch path)
    mask: torch.Tensor | None  # [B, 1, Qmax, L] additive 0 / -inf (SDPA's form), None when nothing is masked
    whole: bool  # the step's one-token queries in order: q and the output need no gather/scatter
    # decode sub-batches (Qmax == 1), _decode_attention:
    key_rows: torch.Tensor | None = None  # [B * kv_heads * L] rows of the pool seen as [slots * kv_heads, head_dim]
    bag_rows: torch.Tensor | None = None  # [B * heads * L] the value row behind each probability (float32 pools)
    bag_offsets: torch.Tensor | None = None  # [B * heads] where each (sequence, head)'s L rows start in bag_rows


@dataclass
class SubBatch:
    token_index: torch.Tensor  # [B, Qmax] index into the step's tokens (padding repeats a valid index)
    valid_q: torch.Tensor  # [B, Qmax] bool
    key_slots: torch.Tensor  # [B, Lmax] cache slot of each key position
    mask: torch.Tensor  # [B, 1, Qmax, Lmax] bool, True = attend
    plan: CpuPlan | None = None  # cpu_plan(...): None only where no layer reads it (native attention)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
             slot_mapping: torch.Tensor) -> None:
    # k, v: [num_tokens, kv_heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim]
    write_pool(k_cache, k, slot_mapping)
    write_pool(v_cache, v, slot_mapping)


def _gather(pool: KVPool, slots: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """pool[slots] -> [*shape, kv_heads, head_dim] (pool: [num_blocks, block_size, kv_heads, head_dim]; slots: 1-d)."""
    return gather_rows(pool, slots, dtype, per_head=False).view(*shape, *pool.shape[2:])


def uses_bags(dtype: torch.dtype, v_cache: KVPool) -> bool:
    """Whether decode attention reads values in place (embedding_bag): float32 queries and a plain float32 pool."""
    return dtype == torch.float32 and isinstance(v_cache, torch.Tensor) and v_cache.dtype == torch.float32


def cpu_plan(sb: SubBatch, num_tokens: int, dtype: torch.dtype, num_heads: int, kv_heads: int,
             bags: bool) -> CpuPlan:
    """Per step, shared by every layer of the group: the flat key slots; the mask as an additive 0 / -inf tensor,
    which SDPA would otherwise build from the bool mask in every layer, or None when nothing is masked; and for
    decode sub-batches the pool rows of each (sequence, kv head) and, with `bags` (float32 pools), the value rows
    behind each (sequence, query head)'s probabilities."""
    b, qmax = sb.token_index.shape
    mask = None
    if not bool(sb.mask.all()):
        mask = torch.zeros(sb.mask.shape, dtype=dtype, device=sb.mask.device).masked_fill_(~sb.mask, -float("inf"))
    plan = CpuPlan(sb.key_slots.reshape(-1), mask, qmax == 1 and b == num_tokens)
    if qmax == 1:
        length = sb.key_slots.shape[1]
        heads = torch.arange(kv_heads, device=sb.key_slots.device)
        rows = sb.key_slots[:, None, :] * kv_heads + heads[:, None]  # [B, kv_heads, L]
        plan.key_rows = rows.reshape(-1)
        if bags:
            groups = num_heads // kv_heads
            plan.bag_rows = rows[:, :, None, :].expand(b, kv_heads, groups, length).reshape(-1)
            plan.bag_offsets = torch.arange(0, b * num_heads * length, length, device=rows.device)
    return plan


def _decode_attention(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool, key_rows: torch.Tensor,
                      mask: torch.Tensor | None, bag_rows: torch.Tensor | None, bag_offsets: torch.Tensor | None,
                      scale: float, softcap: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence. q: [B, heads, head_dim] -> [B, heads, head_dim]; mask: [B, 1, 1, L] additive;
    sinks: [heads] (softmax_with_sinks) or None.

    The G = heads / kv_heads query heads of a kv head share its gathered keys: scores are one batched matmul
    [B * kv_heads, G, head_dim] x [B * kv_heads, head_dim, L] of the scaled queries (the scale folded into q's
    copy: the same bits for power-of-two scales, else float rounding apart), then softcap, mask and a float32
    softmax as HF eager's. With bag_rows (a float32 pool), out[b, h] = sum_l p[b, h, l] * V[row(b, h, l)] is an
    embedding_bag over the pool's rows in place; otherwise the values are gathered (and dequantized) like the keys.
    Padding positions hold slot 0 and a -inf mask: probability 0."""
    b, h, d = q.shape
    kv_heads = k_cache.shape[2]
    k = gather_rows(k_cache, key_rows, q.dtype).view(b * kv_heads, -1, d)
    q = torch.mul(q, scale)  # (a contiguous copy: q is a view into the fused projection)
    scores = torch.bmm(q.view(b * kv_heads, h // kv_heads, d), k.transpose(1, 2))  # [B * kv_heads, G, L]
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if mask is not None:
        scores.view(b, kv_heads, h // kv_heads, -1).add_(mask)
    if sinks is None:
        probs = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)  # [B * kv_heads, G, L]
    else:
        probs = softmax_with_sinks(scores.view(b, kv_heads, h // kv_heads, -1), sinks.view(kv_heads, -1)[None])
        probs = probs.to(q.dtype).contiguous().view(scores.shape)
    if bag_rows is not None:
        return F.embedding_bag(bag_rows, v_cache.view(-1, d), bag_offsets, mode="sum",
                               per_sample_weights=probs.view(-1)).view(b, h, d)
    v = gather_rows(v_cache, key_rows, q.dtype).view(b * kv_heads, -1, d)
    return torch.bmm(probs, v).view(b, h, d)


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """softmax over [scores, sink] with the sink's column dropped (gpt-oss's attention sinks: a learned logit per
    head that takes probability from the keys, with a zero value), in float32 as HF's eager attention.
    scores: [..., heads..., L]; sinks broadcastable to scores[..., :1] without its last dim."""
    s = scores.float()
    combined = torch.cat([s, sinks.float()[..., None].expand(*s.shape[:-1], 1)], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    return torch.softmax(combined, dim=-1)[..., :-1]


def paged_attention_ref(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool, sub_batches: list[SubBatch],
                        scale: float, softcap: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the step's queries over the pools, one SDPA (or decode attention) per sub-batch, each through
    its plan (cpu_plan). q: [num_tokens, heads, head_dim] -> [num_tokens, heads, head_dim]"""
    num_heads = q.shape[1]
    kv_heads = k_cache.shape[2]
    out = None
    for sb in sub_batches:
        plan = sb.plan
        if plan.key_rows is not None:  # decode sub-batch
            rows = None if plan.whole else sb.token_index[:, 0]
            args = (plan.key_rows, plan.mask, plan.bag_rows, plan.bag_offsets, scale, softcap, sinks)
            if torch.compiler.is_compiling():  # opaque to inductor: the eager path's bits (models/cpu_compile.py)
                op = _decode_attention_op(q if rows is None else q[rows], k_cache, v_cache, *args)
            else:
                op = _decode_attention(q if rows is None else q[rows], k_cache, v_cache, *args)
            if rows is None:
                return op
            if out is None:
                out = torch.empty_like(q)
            out[rows] = op
            continue
        qp = q.unsqueeze(2) if plan.whole else q[sb.token_index].transpose(1, 2)  # [B, H, Qmax, D]
        kp = _gather(k_cache, plan.slots, sb.key_slots.shape, q.dtype).transpose(1, 2)  # [B, KVH, L, D]
        vp = _gather(v_cache, plan.slots, sb.key_slots.shape, q.dtype).transpose(1, 2)
        if softcap is None and sinks is None:
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=plan.mask, scale=scale,
                                                enable_gqa=num_heads != kv_heads)
        else:
            op = _manual_attention(qp, kp, vp, sb.mask, scale, softcap, sinks)
        if plan.whole:
            return op.squeeze(2)
        op = op.transpose(1, 2)  # [B, Qmax, H, D]
        if out is None:
            out = torch.empty_like(q)
        out[sb.token_index[sb.valid_q]] = op[sb.valid_q]
    return out


# The decode attention as one op torch.compile keeps opaque (models/cpu_compile.py): inductor would fuse the scale,
# mask and softmax into its own loops, which sum in another order than ATen's softmax.
_lib = torch.library.Library("hearthlm", "FRAGMENT")
_lib.define("decode_attention(Tensor q, Tensor k, Tensor? k_scales, Tensor v, Tensor? v_scales, Tensor key_rows, "
            "Tensor? mask, Tensor? bag_rows, Tensor? bag_offsets, float scale, float? softcap, Tensor? sinks=None"
            ") -> Tensor")


def _decode_attention_impl(q, k, k_scales, v, v_scales, key_rows, mask, bag_rows, bag_offsets, scale, softcap,
                           sinks=None):
    k_cache = k if k_scales is None else QuantizedKVCache(k, k_scales)
    v_cache = v if v_scales is None else QuantizedKVCache(v, v_scales)
    return _decode_attention(q, k_cache, v_cache, key_rows, mask, bag_rows, bag_offsets, scale, softcap, sinks)


_lib.impl("decode_attention", _decode_attention_impl, "CompositeExplicitAutograd")
torch.library.register_fake("hearthlm::decode_attention",
                            lambda q, *args: torch.empty_like(q, memory_format=torch.contiguous_format), lib=_lib)


def _decode_attention_op(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool, *args) -> torch.Tensor:
    def parts(pool):
        return (pool.codes, pool.scales) if isinstance(pool, QuantizedKVCache) else (pool, None)

    return torch.ops.hearthlm.decode_attention(q, *parts(k_cache), *parts(v_cache), *args)


def _manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                      softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Masked attention with a softcap and/or sinks (which SDPA lacks). q: [B, H, Q, D], k/v: [B, KVH, L, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    else:
        probs = softmax_with_sinks(scores, sinks[:, None])
    return torch.matmul(probs.to(q.dtype), v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[KVPool, KVPool], meta,
                    layer: int, scale: float, softcap: float | None, kv_written: bool = False,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Store this step's K/V (unless the caller already did: kv_written) and attend over each sequence's cached
    context, through the step's backend (meta: its metadata, runtime/backends/).
    q: [num_tokens, heads, head_dim], k/v: [num_tokens, kv_heads, head_dim] -> [num_tokens, heads, head_dim];
    sinks: [heads] float32 attention sinks (gpt-oss) or None."""
    if sinks is None:
        return meta.attend(q, k, v, kv_cache, layer, scale, softcap, kv_written)
    return meta.attend(q, k, v, kv_cache, layer, scale, softcap, kv_written, sinks)
