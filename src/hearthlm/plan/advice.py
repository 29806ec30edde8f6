"""Concrete, numbered advice for a MemoryPlan: what to change, what it buys, what it costs.

Advice is ranked by cost tier (quality first, speed mapped onto the same scale), cheapest first:
    0 none        fewer parallel requests, a bigger device, less headroom
    1 negligible  q8_0 / q6_k / fp8 / int8 weights, fp8 KV cache (perplexity +0.004 or less on 7B),
                  partial offload under 1.5x slower
    2 small       q5_k_m weights (+0.01 ppl), partial offload under 3x slower
    3 moderate    q4_k_m / int4 weights (+0.05 ppl), a shorter --ctx, partial offload under 10x slower
    4 large       q3_k_m / q2_k weights (+0.24 / +0.87 ppl), partial offload 10x slower or worse
(perplexity deltas: llama.cpp's quantize table for LLaMA-7B.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig
from .memory import (
    DEVICE_PRESETS,
    KV_DTYPE_BYTES,
    QUANT_BITS_PER_WEIGHT,
    MemoryPlan,
    effective_bits_per_weight,
    gib,
    make_plan,
)

QUANT_LADDER = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
QUANT_COST_TIER = {"q8_0": 1, "q6_k": 1, "fp8": 1, "int8": 1, "int8-gptq-g128": 1, "q5_k_m": 2, "q4_k_m": 3,
                   "int4": 3, "int4-awq-g128": 3, "q3_k_m": 4, "q2_k": 4}
TIER_NAMES = ("none", "negligible", "small", "moderate", "large")


@dataclass
class Advice:
    flag: str  # what to pass, e.g. "--kv-cache-dtype fp8"
    text: str  # one line with the before -> after numbers
    cost_tier: int  # 0..4, see module docstring
    cost: str  # what it costs, in words
    fits: bool  # this change alone makes the requested plan run
    numbers: dict[str, Any] = field(default_factory=dict)


def _replan(cfg: ModelConfig, plan: MemoryPlan, **changes: Any) -> MemoryPlan:
    args: dict[str, Any] = {
        "quant": plan.quant, "ctx": plan.ctx, "concurrency": plan.concurrency, "kv_dtype": plan.kv_dtype,
        "device_bytes": plan.device, "gpu_memory_utilization": plan.gpu_memory_utilization,
        "gpu_layers": plan.requested_gpu_layers, "max_num_batched_tokens": plan.max_num_batched_tokens}
    weights = None if "quant" in changes else plan.weights_detail
    args.update(changes)
    return make_plan(cfg, **args, weights=weights, host_bytes=plan.host_available_bytes, block_size=plan.block_size)


def _offload_tier(slowdown: float) -> int:
    return 1 if slowdown < 1.5 else 2 if slowdown < 3 else 3 if slowdown < 10 else 4


def _nice_ctx(tokens: int) -> int:
    """Round down to a multiple of 1,024 (to a multiple of 16 below that)."""
    return tokens // 1024 * 1024 if tokens >= 1024 else tokens // 16 * 16


def advise(cfg: ModelConfig, plan: MemoryPlan) -> list[Advice]:
    """Advice to make `plan` run (when not plan.ok) or to go further (when it does), cheapest first."""
    out: list[Advice] = []
    gpu = plan.device.kind == "gpu"
    conc, ctx = plan.concurrency, plan.ctx

    if not plan.ok:
        if plan.max_concurrency >= 1 and plan.max_concurrency < conc:
            out.append(Advice(f"--concurrency {plan.max_concurrency}",
                              f"lower --concurrency to {plan.max_concurrency} (from {conc}): at ctx {ctx:,}, "
                              f"{plan.max_concurrency} sequences fit; others wait in the queue",
                              0, "throughput only", True, {"concurrency": plan.max_concurrency}))
        if gpu and plan.gpu_memory_utilization < 0.95:
            p = _replan(cfg, plan, gpu_memory_utilization=0.95)
            if p.ok:
                out.append(Advice("--gpu-memory-utilization 0.95",
                                  f"raise --gpu-memory-utilization to 0.95: usable {gib(plan.usable_bytes)} -> "
                                  f"{gib(p.usable_bytes)}", 0, "less headroom for other processes", True,
                                  {"usable_bytes": p.usable_bytes}))
        need = math.ceil(plan.total_bytes / plan.gpu_memory_utilization)
        bigger = next((d for d in sorted(DEVICE_PRESETS.values(), key=lambda d: d.memory_bytes)
                       if d.memory_bytes >= need), None)
        if gpu:
            out.append(Advice(f"--device {bigger.name}" if bigger else "--tensor-parallel-size",
                              f"a device with {gib(need)} (total {gib(plan.total_bytes)} at utilization "
                              f"{plan.gpu_memory_utilization:g})" + (f", e.g. {bigger.name}" if bigger else
                                                                     ", more than any single preset: split it"),
                              0, "hardware", True, {"device_bytes_needed": need}))

    if KV_DTYPE_BYTES[plan.kv_dtype] > 1:
        p = _replan(cfg, plan, kv_dtype="fp8")
        if p.max_concurrency > plan.max_concurrency or p.max_context > plan.max_context:
            ratio = p.max_concurrency / plan.max_concurrency if plan.max_concurrency else float("inf")
            gain = f" ({ratio:.1f}x)" if math.isfinite(ratio) else ""
            out.append(Advice("--kv-cache-dtype fp8",
                              f"fp8 KV cache: KV {gib(plan.kv_bytes)} -> {gib(p.kv_bytes)}; max concurrency at ctx "
                              f"{ctx:,}: {plan.max_concurrency} -> {p.max_concurrency}{gain}; max context at "
                              f"concurrency {conc}: {plan.max_context:,} -> {p.max_context:,}"
                              + (" (fits)" if p.ok and not plan.ok else ""),
                              1, "negligible quality", p.ok,
                              {"kv_bytes": p.kv_bytes, "max_concurrency": p.max_concurrency,
                               "max_context": p.max_context}))

    current_bpw = effective_bits_per_weight(cfg, plan.weights_bytes)
    for q in QUANT_LADDER:
        if QUANT_BITS_PER_WEIGHT[q] >= current_bpw - 0.05 or plan.verdict == "fits":
            continue
        p = _replan(cfg, plan, quant=q, gpu_layers=None)
        if p.ok:
            out.append(Advice(f"--quant {q}",
                              f"use {q.upper()} instead of {plan.quant.upper()} (weights {gib(plan.weights_bytes)} -> "
                              f"{gib(p.weights_bytes)}): all {p.num_layers} blocks on the device, max concurrency at "
                              f"ctx {ctx:,}: {p.max_concurrency}",
                              QUANT_COST_TIER[q], f"{TIER_NAMES[QUANT_COST_TIER[q]]} quality loss", True,
                              {"weights_bytes": p.weights_bytes, "max_concurrency": p.max_concurrency}))
            break

    if not plan.ok and 16 <= plan.max_context < ctx:
        new = _nice_ctx(plan.max_context)
        out.append(Advice(f"--ctx {new}", f"lower --ctx to {new:,} (from {ctx:,}) at concurrency {conc}",
                          3, "prompts + outputs longer than that are refused", True, {"ctx": new}))
    if plan.ok and plan.verdict == "fits":
        if plan.max_concurrency > conc:
            out.append(Advice(f"--concurrency {plan.max_concurrency}",
                              f"room for --concurrency up to {plan.max_concurrency} at ctx {ctx:,}",
                              0, "none", True, {"max_concurrency": plan.max_concurrency}))
        if plan.max_context > ctx:
            out.append(Advice(f"--ctx {plan.max_context}",
                              f"room for --ctx up to {plan.max_context:,} at concurrency {conc}"
                              + (" (the model's maximum)" if plan.max_context == cfg.max_position_embeddings else ""),
                              0, "none", True, {"max_context": plan.max_context}))

    if gpu and not plan.ok:
        p = plan if plan.verdict == "partial_offload" else _replan(cfg, plan, gpu_layers="auto")
        if p.verdict == "partial_offload" and p.gpu_layers > 0:
            out.append(Advice(f"--gpu-layers {p.gpu_layers}",
                              f"--gpu-layers {p.gpu_layers} (partial offload, {p.gpu_layers} of {p.num_layers} blocks "
                              f"on the device, {p.cpu_weight_read_fraction:.0%} of weight reads from RAM, "
                              f"~{p.slowdown:.1f}x slower decode)",
                              _offload_tier(p.slowdown), f"speed: ~{p.slowdown:.1f}x slower decode", True,
                              {"gpu_layers": p.gpu_layers, "slowdown": round(p.slowdown, 2),
                               "host_bytes": p.host_bytes}))
    return sorted(out, key=lambda a: (a.cost_tier, not a.fits))


__all__ = ["QUANT_LADDER", "Advice", "advise"]
