"""Fused mixture-of-experts MLP (as vLLM's fused_moe): y[t] = sum over r < k of
topk_weights[t, r] * (SiLU(x[t] @ gate[e]^T) * (x[t] @ up[e]^T)) @ w2[e]^T, e = topk_ids[t, r].

  moe_align        torch ops, no host syncs: the T * k (token, rank) pairs sorted by expert, each expert's run
                   padded to a multiple of BLOCK_M (pad entries hold the sentinel T * k), and the expert of each
                   BLOCK_M block (-1 past the used blocks). Buffer sizes follow from (T, k, E, BLOCK_M) alone (the
                   worst-case padding), so a decode step captures in a CUDA graph.
  _moe_gemm_kernel grouped GEMM, one program per (block of one expert's pairs, BLOCK_N columns):
                   GATED: h[pair] = SiLU(x @ gate^T) * (x @ up^T) -> [T * k, I] in x's dtype;
                   else:  p[pair] = (h @ w2^T) * topk_weight -> [T * k, H] float32.
                   QUANT: the weights are kernels/quant_matmul.py's packed group codes (dequantized in registers).
  _sum_k_kernel    y[t] = p[t, 0] + p[t, 1] + ... in rank order, float32, one cast to x's dtype.
Batch invariance: a pair's row is a fixed-order K reduction of its own inputs (the tile config never follows T),
and a token's k partials are summed in rank order without atomics, so a token's output does not depend on the
other tokens of the batch. fp32 experts multiply in IEEE fp32 (no TF32).
`fused_moe` / `fused_moe_quant` run Triton on CUDA tensors, else the torch references (the CPU fallback).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton_utils import HAS_TRITON, use_triton
from .quant_matmul import code_width, dequantize_ref


@dataclass(frozen=True)
class MoEConfig:
    """Tiles of both GEMMs. Chosen from the shapes and dtype only, never from T (batch invariance)."""
    block_m: int = 16  # pairs per program (padding granularity of each expert's run)
    block_n: int = 64
    block_k: int = 64  # K per step (quantized: K covered by BLOCK_K * bits // 16 words)
    num_warps: int = 4
    num_stages: int = 3


GPU_CONFIG = MoEConfig()
INTERP_CONFIG = MoEConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)


def moe_config(x: torch.Tensor) -> MoEConfig:
    return GPU_CONFIG if x.is_cuda else INTERP_CONFIG


# ------------------------------------------------------------------------------------------------ references
def _moe_ref(x: torch.Tensor, w13_of, w2_of, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The kernels' arithmetic in torch: float32 products, h rounded to x's dtype, partials summed in rank order."""
    t, hidden = x.shape
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    tw = topk_weights.reshape(-1).float()
    partial = torch.zeros(t * k, hidden, dtype=torch.float32, device=x.device)
    for e in torch.unique(flat).tolist():
        pairs = (flat == e).nonzero().squeeze(1)
        w13 = w13_of(e).float()
        inter = w13.shape[0] // 2
        g = x[pairs // k].float() @ w13.t()
        h = (F.silu(g[:, :inter]) * g[:, inter:]).to(x.dtype)
        partial[pairs] = (h.float() @ w2_of(e).float().t()) * tw[pairs, None]
    p = partial.view(t, k, hidden)
    out = p[:, 0].clone()
    for r in range(1, k):
        out += p[:, r]
    return out.to(x.dtype)


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """x: [T, H], w13: [E, 2I, H] (gate rows, then up rows), w2: [E, H, I], topk_*: [T, k] -> [T, H] x.dtype."""
    return _moe_ref(x, lambda e: w13[e], lambda e: w2[e], topk_weights, topk_ids)


def fused_moe_quant_reference(x: torch.Tensor, w13_codes: torch.Tensor, w13_scale: torch.Tensor,
                              w13_mins: torch.Tensor | None, w2_codes: torch.Tensor, w2_scale: torch.Tensor,
                              w2_mins: torch.Tensor | None, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                              bits: int, group: int) -> torch.Tensor:
    """fused_moe_reference on experts dequantized from kernels/quant_matmul.py's layout (per expert e:
    codes[e] [N, K * bits // 16] int16, scale[e] / mins[e] [N, K // group])."""
    def w13_of(e: int) -> torch.Tensor:
        return dequantize_ref(w13_codes[e], w13_scale[e], None if w13_mins is None else w13_mins[e], bits, group)

    def w2_of(e: int) -> torch.Tensor:
        return dequantize_ref(w2_codes[e], w2_scale[e], None if w2_mins is None else w2_mins[e], bits, group)
    return _moe_ref(x, w13_of, w2_of, topk_weights, topk_ids)


# ------------------------------------------------------------------------------------------------ alignment
def aligned_size(pairs: int, num_experts: int, block_m: int) -> int:
    """Slots of the sorted pair list: every pair plus the worst-case padding of each expert that can be used."""
    worst = pairs + min(num_experts, pairs) * (block_m - 1)
    return -(-worst // block_m) * block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids: [T, k] -> (sorted_pairs [aligned_size] int32: pair t * k + r grouped by expert, in increasing
    pair order within an expert, each expert's run padded to BLOCK_M with T * k; block_expert
    [aligned_size // BLOCK_M] int32, -1 for blocks past the last expert's run). Torch ops only, no host sync."""
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    dev = flat.device
    cap = aligned_size(n, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + (block_m - 1)) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.sort(flat, stable=True).indices
    se = flat[order]
    first = counts.cumsum(0) - counts  # each expert's first index in `order`
    dest = (ends - padded)[se] + torch.arange(n, device=dev) - first[se]
    sorted_pairs = torch.full((cap,), n, dtype=torch.int32, device=dev).scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, cap, block_m, device=dev)
    block_expert = torch.searchsorted(ends, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


# ----------------------------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    import triton
    import triton.language as tl

    from .quant_matmul import _sub

    @triton.jit
    def _dot(a, w, acc, IEEE: tl.constexpr):
        if IEEE:  # float32 operands: exact products, no TF32
            return tl.dot(a, w, acc, input_precision="ieee")
        return tl.dot(a, w, acc)

    @triton.jit(do_not_specialize=["n_pairs"])  # one compiled variant for every T
    def _moe_gemm_kernel(a_ptr, w_ptr, s_ptr, m_ptr, out_ptr, tw_ptr, sorted_ptr, bexp_ptr,
                         N, K, n_pairs, stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om,
                         A_DIV: tl.constexpr, GATED: tl.constexpr, QUANT: tl.constexpr, T: tl.constexpr,
                         GROUP: tl.constexpr, HAS_MIN: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[pair, n] for this block's pairs; a row = pair // A_DIV (x: k, h: 1). GATED: columns n of gate (rows
        n of w[e]) and of up (rows N + n), SiLU(gate) * up; else times the pair's routing weight."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(bexp_ptr + pid_m)
        if e < 0:
            return
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < n_pairs
        a_rows = a_ptr + (tl.where(valid, pairs, 0) // A_DIV).to(tl.int64)[:, None] * stride_am
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped: weight loads need no mask along N
        e64 = e.to(tl.int64)
        w_cols = w_ptr + e64 * stride_we + rows[None, :] * stride_wn
        s_cols = s_ptr + e64 * stride_se + rows[None, :] * stride_sn
        m_cols = m_ptr + e64 * stride_se + rows[None, :] * stride_sn
        up_w = N * stride_wn  # offset of the up rows
        up_s = N * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if QUANT:
            BLOCK_W: tl.constexpr = BLOCK_K // T
            W = K // T
            for w0 in range(0, W, BLOCK_W):
                wid = w0 + tl.arange(0, BLOCK_W)
                wm = (wid < W)[:, None]
                kbase = (wid // 8) * (8 * T) + wid % 8  # K of sub-code 0 of each word; sub-code t: + 8 t
                g = (kbase // GROUP)[:, None]
                q = tl.load(w_cols + wid[:, None], mask=wm, other=0).to(tl.int32)  # [BLOCK_W, BLOCK_N]
                s = tl.load(s_cols + g, mask=wm, other=0.0).to(tl.float32)
                mn = s
                if HAS_MIN:
                    mn = tl.load(m_cols + g, mask=wm, other=0.0).to(tl.float32)
                q_up = q
                s_up = s
                mn_up = s
                if GATED:
                    q_up = tl.load(w_cols + up_w + wid[:, None], mask=wm, other=0).to(tl.int32)
                    s_up = tl.load(s_cols + up_s + g, mask=wm, other=0.0).to(tl.float32)
                    if HAS_MIN:
                        mn_up = tl.load(m_cols + up_s + g, mask=wm, other=0.0).to(tl.float32)
                xm = valid[:, None] & (wid < W)[None, :]
                for t in tl.static_range(T):
                    a = tl.load(a_rows + (kbase + 8 * t)[None, :], mask=xm, other=0.0)  # [BLOCK_M, BLOCK_W]
                    v = _sub(q, t, T) * s
                    if HAS_MIN:
                        v += mn
                    acc = _dot(a, v.to(a.dtype), acc, IEEE)
                    if GATED:
                        v = _sub(q_up, t, T) * s_up
                        if HAS_MIN:
                            v += mn_up
                        acc_up = _dot(a, v.to(a.dtype), acc_up, IEEE)
        else:
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                km = kk < K
                a = tl.load(a_rows + kk[None, :], mask=valid[:, None] & km[None, :], other=0.0)
                w = tl.load(w_cols + kk[:, None], mask=km[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
                acc = _dot(a, w.to(a.dtype), acc, IEEE)
                if GATED:
                    w = tl.load(w_cols + up_w + kk[:, None], mask=km[:, None], other=0.0)
                    acc_up = _dot(a, w.to(a.dtype), acc_up, IEEE)
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        else:
            acc = acc * tl.load(tw_ptr + pairs, mask=valid, other=0.0)[:, None]
        out = out_ptr + tl.where(valid, pairs, 0).to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])

    @triton.jit
    def _sum_k_kernel(p_ptr, y_ptr, H, KTOP: tl.constexpr, BLOCK: tl.constexpr):
        """y[t] = p[t * KTOP] + p[t * KTOP + 1] + ... (rank order, float32)."""
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H
        row = p_ptr + t * KTOP * H + offs
        acc = tl.load(row, mask=mask, other=0.0)
        for r in tl.static_range(1, KTOP):
            acc += tl.load(row + r * H, mask=mask, other=0.0)
        tl.store(y_ptr + t * H + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _run(x: torch.Tensor, w13, s13, m13, w2, s2, m2, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
         num_experts: int, inter: int, quant: tuple[int, int] | None, cfg: MoEConfig) -> torch.Tensor:
    t, hidden = x.shape
    k = topk_ids.shape[1]
    n = t * k
    y = torch.empty_like(x)
    if t == 0:
        return y
    sorted_pairs, block_expert = moe_align(topk_ids, num_experts, cfg.block_m)
    tw = topk_weights.reshape(-1).float().contiguous()
    h = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    p = torch.empty(n, hidden, dtype=torch.float32, device=x.device)
    bits, group = quant if quant is not None else (16, 1)
    common = dict(QUANT=quant is not None, T=16 // bits, GROUP=group, IEEE=x.dtype == torch.float32,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    blocks = block_expert.numel()
    for a, w, s, m, out, nn, kk, a_div, gated in ((x, w13, s13, m13, h, inter, hidden, k, True),
                                                  (h, w2, s2, m2, p, hidden, inter, 1, False)):
        s = s if s is not None else w  # unused when not quantized
        _moe_gemm_kernel[(blocks, triton.cdiv(nn, cfg.block_n))](
            a, w, s, m if m is not None else s, out, tw, sorted_pairs, block_expert,
            nn, kk, n, a.stride(0), w.stride(0), w.stride(1), s.stride(0), s.stride(1), out.stride(0),
            A_DIV=a_div, GATED=gated, HAS_MIN=m is not None, **common)
    block = min(1024, triton.next_power_of_2(hidden))
    _sum_k_kernel[(t, triton.cdiv(hidden, block))](p, y, hidden, KTOP=k, BLOCK=block)
    return y


def _check_routing(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, x.shape
    assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == x.shape[0], (topk_ids.shape, x.shape)


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, cfg: MoEConfig | None = None) -> torch.Tensor:
    """The Triton path of fused_moe (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    _check_routing(x, topk_weights, topk_ids)
    e, two_i, hidden = w13.shape
    assert hidden == x.shape[1] and w2.shape == (e, hidden, two_i // 2), (w13.shape, w2.shape, x.shape)
    w13, w2 = w13.contiguous(), w2.contiguous()
    return _run(x, w13, None, None, w2, None, None, topk_weights, topk_ids, e, two_i // 2, None,
                cfg or moe_config(x))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """x: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]; topk_weights: [T, k] float32;
    topk_ids: [T, k] int32 -> [T, H] in x's dtype. Triton on CUDA, else the torch reference."""
    if use_triton(x):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids)
    return fused_moe_reference(x, w13, w2, topk_weights, topk_ids)


def fused_moe_quant_triton(x: torch.Tensor, w13_codes: torch.Tensor, w13_scale: torch.Tensor,
                           w13_mins: torch.Tensor | None, w2_codes: torch.Tensor, w2_scale: torch.Tensor,
                           w2_mins: torch.Tensor | None, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                           bits: int, group: int, cfg: MoEConfig | None = None) -> torch.Tensor:
    """The Triton path of fused_moe_quant."""
    _check_routing(x, topk_weights, topk_ids)
    cfg = cfg or moe_config(x)
    e, two_i, _ = w13_codes.shape
    hidden, inter = x.shape[1], two_i // 2
    assert bits in (4, 8) and group % (128 // bits) == 0 and group & (group - 1) == 0, (bits, group)
    assert w13_codes.dtype == w2_codes.dtype == torch.int16, (w13_codes.dtype, w2_codes.dtype)
    assert code_width(w13_codes[0], bits) == hidden and w2_codes.shape[:2] == (e, hidden), (w13_codes.shape,)
    assert code_width(w2_codes[0], bits) == inter and hidden % group == 0 and inter % group == 0, w2_codes.shape
    assert w13_scale.shape == (e, two_i, hidden // group) and w2_scale.shape == (e, hidden, inter // group)
    assert cfg.block_k % (128 // bits) == 0, cfg  # whole 8-word chunks per step
    ts = [t.contiguous() if t is not None else None for t in (w13_codes, w13_scale, w13_mins, w2_codes, w2_scale,
                                                               w2_mins)]
    return _run(x, *ts, topk_weights, topk_ids, e, inter, (bits, group), cfg)


def fused_moe_quant(x: torch.Tensor, w13_codes: torch.Tensor, w13_scale: torch.Tensor,
                    w13_mins: torch.Tensor | None, w2_codes: torch.Tensor, w2_scale: torch.Tensor,
                    w2_mins: torch.Tensor | None, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    bits: int, group: int) -> torch.Tensor:
    """fused_moe with experts in kernels/quant_matmul.py's packed layout (layers/gpu_quant.QuantWeight, stacked):
    w13_codes [E, 2I, H * bits // 16] int16 (gate rows, then up rows), w13_scale / w13_mins [E, 2I, H // group];
    w2_codes [E, H, I * bits // 16], w2_scale / w2_mins [E, H, I // group]; mins None: symmetric codes.
    bits 4 (unsigned codes) or 8 (signed). Triton on CUDA, else the torch reference."""
    args = (x, w13_codes, w13_scale, w13_mins, w2_codes, w2_scale, w2_mins, topk_weights, topk_ids, bits, group)
    if use_triton(x):
        return fused_moe_quant_triton(*args)
    return fused_moe_quant_reference(*args)
