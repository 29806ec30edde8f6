"""Paged attention: write new K/V through the slot mapping, attend through block tables.

Two paths share one metadata object: the Triton kernels (CUDA) and this torch reference, which runs one attention
per sub-batch (decodes together, prefills together) so that no compute is spent on padding between them. Prefill
sub-batches gather each sequence's keys into a padded batch for one masked SDPA. Decode sub-batches (one query per
sequence) skip SDPA, whose CPU kernel is slow for single queries: the keys are gathered per kv head for one batched
matmul with the query heads that share them, and the values are never copied: a float32 pool is read in place by
embedding_bag, each head's output being its probability-weighted sum of value rows (`_decode_attention`).
A layer's KV pool is a tensor, or a QuantizedKVCache (--kv-cache-dtype fp8|int8): quantized on write,
dequantized on read (the reference right after the gather, the kernels in registers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kernels.kv_quant import KVPool, QuantizedKVCache, gather_rows, write_pool


@dataclass
class SubBatch:
    token_index: torch.Tensor  # [B, Qmax] index into the step's tokens (padding repeats a valid index)
    valid_q: torch.Tensor  # [B, Qmax] bool
    key_slots: torch.Tensor  # [B, Lmax] cache slot of each key position
    mask: torch.Tensor  # [B, 1, Qmax, Lmax] bool, True = attend
    plan: CpuPlan | None = None  # filled by the reference path on first use (_cpu_plan), then shared by all layers


@dataclass
class CpuPlan:
    """A sub-batch's per-step index work, done by the first layer of its group and reused by the others."""

    slots: torch.Tensor  # [B * L] flat key slots (padded-batch path)
    mask: torch.Tensor | None  # [B, 1, Qmax, L] additive 0 / -inf (SDPA's form), None when nothing is masked
    whole: bool  # the step's one-token queries in order: q and the output need no gather/scatter
    # decode sub-batches (Qmax == 1), _decode_attention:
    key_rows: torch.Tensor | None = None  # [B * kv_heads * L] rows of the pool seen as [slots * kv_heads, head_dim]
    bag_rows: torch.Tensor | None = None  # [B * heads * L] the value row behind each probability (float32 pools)
    bag_offsets: torch.Tensor | None = None  # [B * heads] where each (sequence, head)'s L rows start in bag_rows


@dataclass
class GroupMeta:
    """Per KV group (layers sharing a window and a block table)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    window: int | None
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32 (kernel path)
    sub_batches: list[SubBatch] = field(default_factory=list)  # reference path
    native: object = None  # native_attention's prepared call (kernels/cpu_quant.RowAttention), or False


@dataclass
class AttentionMetadata:
    groups: list[GroupMeta]
    layer_group: list[int]  # layer index -> group index
    seq_lens: torch.Tensor | None = None  # [B] int32, context incl. new tokens (kernel path)
    cu_seqlens_q: torch.Tensor | None = None  # [B+1] int32 (kernel path)
    max_query_len: int = 0
    use_kernels: bool = False
    # kernel path, mixed steps: the first num_decodes sequences decode one token each (the scheduler puts running
    # sequences first) and take the decode kernel
    num_decodes: int = 0
    # kernel path: [num decode rows] int32, those rows longest context first (the decode kernel's program order)
    decode_order: torch.Tensor | None = None
    # --gpu-layers: the same step's metadata on the offloaded blocks' device (reference path), built once per step
    host: AttentionMetadata | None = None
    # kernel path, --batch-invariant: every row (decode, prefill chunk, cached prefix) takes the prefill kernel
    # with one fixed tiling, so a row's arithmetic depends only on its own position and context
    batch_invariant: bool = False


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


def _cpu_plan(sb: SubBatch, num_tokens: int, dtype: torch.dtype, num_heads: int, kv_heads: int,
              bags: bool) -> CpuPlan:
    """Per step, shared by every layer of the group: the flat key slots; the mask as an additive 0 / -inf tensor,
    which SDPA would otherwise build from the bool mask in every layer, or None when nothing is masked; and for
    decode sub-batches the pool rows of each (sequence, kv head) and, with `bags` (float32 pools), the value rows
    behind each (sequence, query head)'s probabilities."""
    if sb.plan is None:
        b, qmax = sb.token_index.shape
        mask = None
        if not bool(sb.mask.all()):
            mask = torch.zeros(sb.mask.shape, dtype=dtype, device=sb.mask.device).masked_fill_(~sb.mask, -float("inf"))
        sb.plan = CpuPlan(sb.key_slots.reshape(-1), mask, qmax == 1 and b == num_tokens)
        if qmax == 1:
            length = sb.key_slots.shape[1]
            heads = torch.arange(kv_heads, device=sb.key_slots.device)
            rows = sb.key_slots[:, None, :] * kv_heads + heads[:, None]  # [B, kv_heads, L]
            sb.plan.key_rows = rows.reshape(-1)
            if bags:
                groups = num_heads // kv_heads
                sb.plan.bag_rows = rows[:, :, None, :].expand(b, kv_heads, groups, length).reshape(-1)
                sb.plan.bag_offsets = torch.arange(0, b * num_heads * length, length, device=rows.device)
    return sb.plan


def _decode_attention(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool, key_rows: torch.Tensor,
                      mask: torch.Tensor | None, bag_rows: torch.Tensor | None, bag_offsets: torch.Tensor | None,
                      scale: float, softcap: float | None) -> torch.Tensor:
    """One query per sequence. q: [B, heads, head_dim] -> [B, heads, head_dim]; mask: [B, 1, 1, L] additive.

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
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)  # [B * kv_heads, G, L]
    if bag_rows is not None:
        return F.embedding_bag(bag_rows, v_cache.view(-1, d), bag_offsets, mode="sum",
                               per_sample_weights=probs.view(-1)).view(b, h, d)
    v = gather_rows(v_cache, key_rows, q.dtype).view(b * kv_heads, -1, d)
    return torch.bmm(probs, v).view(b, h, d)


def native_rows(gm: GroupMeta, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The step's rows as the native kernel takes them: (key_slots flat, key_start [T], key_count [T]), each token
    attending its valid keys (one run in position order) of its sub-batch row; None when the rows' keys are not
    runs or the sub-batches do not cover the step's tokens."""
    from ..kernels.cpu_quant import key_ranges

    start = torch.full((num_tokens,), -1, dtype=torch.long)
    count = torch.zeros(num_tokens, dtype=torch.long)
    slots, base = [], 0
    for sb in gm.sub_batches:
        b, qmax = sb.token_index.shape
        length = sb.key_slots.shape[1]
        tok = sb.token_index[sb.valid_q]
        try:
            first, n = key_ranges(sb.mask[:, 0][sb.valid_q])
        except ValueError:
            return None
        row = torch.arange(b)[:, None].expand(b, qmax)[sb.valid_q]
        start[tok] = base + row * length + first
        count[tok] = n
        slots.append(sb.key_slots.reshape(-1))
        base += b * length
    if not slots or bool((start < 0).any()):
        return None
    return torch.cat(slots), start, count


def native_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: tuple[KVPool, KVPool],
                     meta: AttentionMetadata, layer: int, num_heads: int, scale: float,
                     softcap: float | None, lib=None) -> torch.Tensor | None:
    """RoPE, K/V writes and attention in one call of the native CPU kernel (kernels/cpu_quant.py) for every row
    of the step, prefill and decode alike (the same per-row arithmetic, so a row's result does not depend on the
    batch, the chunking or the prefix cache), over float32 pools; else None (the caller takes the torch path).
    qkv: [T, (heads + 2 kv_heads) * head_dim] -> [T, heads * head_dim]. The call's arguments are prepared by the
    group's first layer (cos/sin are the step's) and kept in its GroupMeta. lib: the kernel build the layer's
    weights run (NativeWeight.lib: the engine's cpu_kernel); None: cpu_quant.library()."""
    from ..kernels.cpu_quant import RowAttention

    k_cache, v_cache = kv_cache
    if meta.use_kernels or not isinstance(k_cache, torch.Tensor) or not isinstance(v_cache, torch.Tensor):
        return None
    gm = meta.groups[meta.layer_group[layer]]
    if gm.native is None:
        gm.native = False
        rows = native_rows(gm, qkv.shape[0]) if k_cache.dtype == torch.float32 and not qkv.is_cuda else None
        if rows is not None:
            gm.native = RowAttention(cos, sin, gm.slot_mapping, *rows, num_heads, k_cache.shape[2],
                                     k_cache.shape[3], scale, softcap, lib=lib)
    if gm.native is False or not gm.native.accepts(qkv, k_cache, v_cache):
        return None
    return gm.native(qkv, k_cache, v_cache)


def paged_attention_ref(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool, gm: GroupMeta,
                        scale: float, softcap: float | None) -> torch.Tensor:
    # q: [num_tokens, heads, head_dim] -> [num_tokens, heads, head_dim]
    num_heads = q.shape[1]
    kv_heads = k_cache.shape[2]
    bags = uses_bags(q.dtype, v_cache)
    out = None
    for sb in gm.sub_batches:
        plan = _cpu_plan(sb, q.shape[0], q.dtype, num_heads, kv_heads, bags)
        if plan.key_rows is not None:  # decode sub-batch
            rows = None if plan.whole else sb.token_index[:, 0]
            args = (plan.key_rows, plan.mask, plan.bag_rows, plan.bag_offsets, scale, softcap)
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
        if softcap is None:
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=plan.mask, scale=scale,
                                                enable_gqa=num_heads != kv_heads)
        else:
            op = _softcapped_attention(qp, kp, vp, sb.mask, scale, softcap)
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
            "Tensor? mask, Tensor? bag_rows, Tensor? bag_offsets, float scale, float? softcap) -> Tensor")


def _decode_attention_impl(q, k, k_scales, v, v_scales, key_rows, mask, bag_rows, bag_offsets, scale, softcap):
    k_cache = k if k_scales is None else QuantizedKVCache(k, k_scales)
    v_cache = v if v_scales is None else QuantizedKVCache(v, v_scales)
    return _decode_attention(q, k_cache, v_cache, key_rows, mask, bag_rows, bag_offsets, scale, softcap)


_lib.impl("decode_attention", _decode_attention_impl, "CompositeExplicitAutograd")
torch.library.register_fake("hearthlm::decode_attention",
                            lambda q, *args: torch.empty_like(q, memory_format=torch.contiguous_format), lib=_lib)


def _decode_attention_op(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool, *args) -> torch.Tensor:
    def parts(pool):
        return (pool.codes, pool.scales) if isinstance(pool, QuantizedKVCache) else (pool, None)

    return torch.ops.hearthlm.decode_attention(q, *parts(k_cache), *parts(v_cache), *args)


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          scale: float, softcap: float) -> torch.Tensor:
    # q: [B, H, Q, D], k/v: [B, KVH, L, D]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[KVPool, KVPool],
                    meta: AttentionMetadata, layer: int, scale: float, softcap: float | None,
                    kv_written: bool = False) -> torch.Tensor:
    """Store this step's K/V (unless the caller already did: kv_written) and attend over each sequence's
    cached context."""
    gm = meta.groups[meta.layer_group[layer]]
    k_cache, v_cache = kv_cache
    if meta.use_kernels:
        from ..kernels import paged_decode_attention, paged_prefill_attention, reshape_and_cache

        if not kv_written:
            reshape_and_cache(k, v, k_cache, v_cache, gm.slot_mapping)
        if meta.batch_invariant:
            return paged_prefill_attention(q, k_cache, v_cache, gm.block_tables, meta.cu_seqlens_q, meta.seq_lens,
                                           scale, softcap=softcap, window=gm.window,
                                           max_seqlen_q=meta.max_query_len, invariant=True)
        if meta.max_query_len == 1:
            return paged_decode_attention(q, k_cache, v_cache, gm.block_tables, meta.seq_lens, scale,
                                          softcap=softcap, window=gm.window, seq_order=meta.decode_order)
        d, out = meta.num_decodes, None
        if d:  # the prefill kernel would pad each decode row to a whole query tile and never split its context
            out = torch.empty_like(q)
            paged_decode_attention(q[:d], k_cache, v_cache, gm.block_tables[:d], meta.seq_lens[:d], scale,
                                   softcap=softcap, window=gm.window, out=out[:d], seq_order=meta.decode_order)
        return paged_prefill_attention(q, k_cache, v_cache, gm.block_tables, meta.cu_seqlens_q, meta.seq_lens,
                                       scale, softcap=softcap, window=gm.window, max_seqlen_q=meta.max_query_len,
                                       first_seq=d, out=out)
    if not kv_written:
        write_kv(k, v, k_cache, v_cache, gm.slot_mapping)
    return paged_attention_ref(q, k_cache, v_cache, gm, scale, softcap)
