"""`hearth plan`: will this model fit, with what context and concurrency, and if not, what to change.

Exit codes: 0 the plan runs, 2 it does not (advice printed), 1 bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..config import normalize_gpu_layers
from ..errors import HearthError
from .flags import add_engine_args, flag_name

# hearthlm.plan is imported inside the functions: it reaches torch through hearthlm.loader, and building the
# `hearth` parser (every subcommand) must not pay for that
if TYPE_CHECKING:
    from ..plan.advice import Advice
    from ..plan.memory import MemoryPlan
    from ..plan.sources import ModelSource

VERDICT_TEXT = {
    "kv_spills": "weights fit, the KV cache for the requested context x concurrency does not",
    "partial_offload": "not all blocks fit on the device",
    "does_not_fit": "does not fit",
}


# the names --help lists, written out: importing hearthlm.plan reaches torch through hearthlm.loader, and
# `hearth plan --help` must not pay for that (tests/cli/test_flags.py keeps these equal to plan's tables)
HELP_PRESETS = ("llama-3.1-8b", "llama-3.2-1b", "qwen3-0.6b", "smollm2-135m", "gemma-2-2b")
HELP_QUANTS = ("f32", "f16", "bf16", "q8_0", "int8", "int8-gptq-g128", "fp8", "q6_k", "q5_1", "q5_k_m", "q5_0",
               "q4_1", "int4", "q4_k_m", "q4_0", "int4-awq-g128", "q3_k_m", "q2_k")
HELP_KV_DTYPES = ("auto", "bf16", "f16", "f32", "fp8", "int8", "fp8_e4m3")
HELP_DEVICES = ("h100", "h200", "a100-80", "a100-40", "rtx4090")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `plan` on an argparse subparsers object; dispatch with `args.func(args)`."""
    p = subparsers.add_parser(
        "plan", help="memory plan: weights, KV cache, activations; will it fit?",
        description="Compute the memory plan of a model before loading anything: weights, KV cache per token "
                    "and for ctx x concurrency, activations, overhead; the verdict, the limits, and advice. "
                    "Exit code 0 when it fits, 2 when it does not, 1 for bad input. The flags are `hearth serve`'s.")
    p.add_argument("model", nargs="?", default="smollm2",
                   help="HF model directory, .gguf file, 'smollm2' (embedded GGUF, default) or a preset: "
                        + ", ".join(HELP_PRESETS))
    # the engine's flags and aliases; values are checked by build_plan (bad input exits 1, not argparse's 2)
    add_engine_args(p, only=("max_model_len", "max_num_seqs", "quantization", "kv_cache_dtype", "gpu_layers",
                             "gpu_memory_utilization", "max_num_batched_tokens", "device", "cpu_moe"),
                    defaults=dict(max_model_len=None, max_num_seqs="1", quantization=None, kv_cache_dtype="auto",
                                  gpu_memory_utilization="0.9", max_num_batched_tokens="2048", device="auto"),
                    kwargs={d: {"type": str} for d in ("max_model_len", "max_num_seqs", "quantization",
                                                        "kv_cache_dtype", "gpu_layers", "gpu_memory_utilization",
                                                        "max_num_batched_tokens")} | {
                        "quantization": {"type": str, "metavar": "QUANT"},
                        "kv_cache_dtype": {"type": str, "metavar": "|".join(HELP_KV_DTYPES)}},
                    hidden={"max_num_seqs": ("--concurrency",), "quantization": ("--quant",)},
                    help=dict(
                        max_model_len="tokens per sequence, e.g. 8192 or 128k (llama.cpp's -c/--ctx-size; default: "
                                      "min(8192, the model's max))",
                        max_num_seqs="sequences decoding together (llama.cpp's -np/--parallel; default 1)",
                        quantization="weight format (default: the file's): " + ", ".join(HELP_QUANTS),
                        kv_cache_dtype="KV cache storage (default auto = the model's dtype, bf16)",
                        gpu_layers="N|auto: the last N blocks on the GPU, the others (and their KV) in RAM, "
                                   "llama.cpp's -ngl; auto = the most that fit (default: all)",
                        gpu_memory_utilization="fraction of device memory to use (default 0.9)",
                        max_num_batched_tokens="tokens per forward (default 2048)",
                        device="|".join(HELP_DEVICES) + "|cpu|auto|<GiB> (default auto)"))
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)
    return p


def _tokens(value: str, flag: str) -> int:
    """'131072', '131,072', '128k', '1m' -> int; ValueError naming the flag."""
    v = str(value).strip().lower().replace(",", "").replace("_", "")
    mult = {"k": 1024, "m": 1024**2}.get(v[-1:], 1)
    try:
        n = int(float(v[:-1] if mult > 1 else v) * mult)
    except ValueError:
        raise ValueError(f"{flag} must be a whole number such as 8192 or 128k, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{flag} must be >= 1, got {value!r}")
    return n


def build_plan(args: argparse.Namespace) -> tuple[ModelSource, MemoryPlan]:
    """Resolve the model and device from `args` and make the plan (raises HearthError / ValueError)."""
    from ..plan.memory import device_spec, make_plan, normalize_quant, system_memory_bytes
    from ..plan.sources import resolve_model

    # a Namespace built by hand may still use the old names (ctx, concurrency, quant)
    want_quant = getattr(args, "quantization", None) or getattr(args, "quant", None)
    want_ctx = getattr(args, "max_model_len", None) or getattr(args, "ctx", None)
    want_seqs = getattr(args, "max_num_seqs", None) or getattr(args, "concurrency", None) or 1
    src = resolve_model(args.model)
    quant, weights = src.quant, src.weights
    if want_quant:
        quant = normalize_quant(want_quant)
        if quant != src.quant:
            weights = None
    ctx = _tokens(want_ctx, flag_name(args, "max_model_len")) if want_ctx else min(8192, src.cfg.max_position_embeddings)
    try:
        util = float(getattr(args, "gpu_memory_utilization", 0.9))
    except ValueError:
        raise ValueError(f"--gpu-memory-utilization must be a number in (0, 1], got {args.gpu_memory_utilization!r}") from None
    gpu_layers = normalize_gpu_layers(getattr(args, "gpu_layers", None))
    device = device_spec(str(getattr(args, "device", "auto")))
    gguf_note = None
    if weights is not None and src.gpu_weights is not None and device.kind == "gpu":
        # the loader's rule (keep_quantized), against the whole device here: the bf16 copy, or the kernels' codes
        from ..loader.load import dense_copy_fits

        if dense_copy_fits(src.gpu_dense_bytes, device.memory_bytes):
            weights, gguf_note = src.gpu_weights["dense"], "GGUF on the GPU: dequantized to bf16 (the copy fits)"
        else:
            weights = src.gpu_weights["quantized"]
            gguf_note = "GGUF on the GPU: kept quantized (the kernels' repacked codes + fp16 scales)"
    if weights is not None and src.cpu_f32_weights is not None and device.kind == "cpu":
        weights, quant = src.cpu_f32_weights, "f32"
        gguf_note = "HF weights on the CPU: held in float32 (the engine's dtype auto there)"
    if weights is not None and src.tensor_types is not None and device.kind == "cpu":
        weights, copies = src.cpu_weights()
        gguf_note = (f"GGUF on the CPU: the int4 kernel's layout, plus {copies / 2**20:,.0f} MiB of bf16 copies for "
                     "batched decode (--cpu-dense-memory caps them)") if copies else \
            "GGUF on the CPU: the int4 kernel's layout (no bf16 copies on this CPU or budget)"
    plan = make_plan(
        src.cfg, quant, ctx, _tokens(want_seqs, flag_name(args, "max_num_seqs")),
        str(getattr(args, "kv_cache_dtype", "auto")), device, util, gpu_layers,
        _tokens(getattr(args, "max_num_batched_tokens", 2048), "--max-num-batched-tokens"),
        weights=weights, host_bytes=system_memory_bytes() if device.kind == "gpu" else None)
    if src.weights is not None and weights is None:
        plan.warnings = [w for w in plan.warnings if not w.startswith("weights estimated")]
        plan.warnings.append(f"the file stores {src.quant}; weights for {quant} are estimated from the config")
    if gguf_note:
        plan.warnings.append(gguf_note)
    return src, plan


def run(args: argparse.Namespace) -> int:
    from ..plan.advice import advise

    try:
        src, plan = build_plan(args)
    except (HearthError, ValueError) as e:
        print(f"hearth plan: error: {e}", file=sys.stderr)
        return 1
    advice = advise(src.cfg, plan)
    cpu_moe = int(getattr(args, "cpu_moe", 0) or 0)
    if cpu_moe < 0:
        print(f"hearth plan: error: --cpu-moe must be a block count >= 0, got {cpu_moe}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        out = {**plan.to_dict(), "source": {"kind": src.kind, "path": src.path}, "num_params": src.cfg.num_params,
               "active_params": src.cfg.active_params, "num_experts": src.cfg.num_experts,
               "advice": [asdict(a) for a in advice]}
        if src.cfg.num_experts and plan.weights_detail is not None:
            from ..plan.memory import expert_bytes

            per_block = expert_bytes(src.cfg, plan.weights_detail)
            out.update(expert_bytes=sum(per_block), cpu_moe=cpu_moe, cpu_moe_bytes=sum(per_block[:cpu_moe]))
        print(json.dumps(out, indent=2))
    else:
        _print_human(src, plan, advice, cpu_moe)
    return 0 if plan.ok else 2


def _experts_row(src: ModelSource, plan: MemoryPlan, cpu_moe: int) -> tuple[str, str, str]:
    """The experts' share of the weights, what a token reads of them, and what --cpu-moe N moves to RAM."""
    from ..plan.memory import expert_bytes, gib

    cfg = src.cfg
    per_block = expert_bytes(cfg, plan.weights_detail)
    total = sum(per_block)
    how = (f"{cfg.num_experts} per MoE block x {sum(b > 0 for b in per_block)} blocks; a token reads "
           f"{cfg.num_experts_per_tok} per block: {gib(total * cfg.num_experts_per_tok / cfg.num_experts)}")
    if cpu_moe:
        how += (f"; --cpu-moe {cpu_moe}: {gib(sum(per_block[:cpu_moe]))} of them in RAM instead of on the device "
                "(the verdict does not deduct them)")
    return "  experts (in weights)", gib(total), how


def _rows(src: ModelSource, plan: MemoryPlan, cpu_moe: int = 0) -> list[tuple[str, str, str]]:
    from ..plan.memory import KV_DTYPE_BYTES, gib

    cfg = src.cfg
    how_w = (f"exact, from the {src.kind.upper()} tensor headers" if plan.weights_exact
             else f"{cfg.num_params / 1e9:.2f} B params at {plan.quant} (estimate)")
    if cfg.num_experts:
        how_w += (f"; {cfg.num_experts} experts, {cfg.num_experts_per_tok} per token: "
                  f"{cfg.active_params / 1e9:.2f} B of {cfg.num_params / 1e9:.2f} B params active, all in memory")
    windows = sorted({w for w in cfg.layer_windows if w is not None})
    kv_how = (f"{plan.kv_bytes_per_token + plan.kv_scale_bytes_per_token:,} B/token x {plan.ctx:,} tokens x "
              f"{plan.concurrency} seq ({plan.kv_dtype}: {KV_DTYPE_BYTES[plan.kv_dtype]} B/elem)")
    if windows:
        kv_how += f"; {sum(w is not None for w in cfg.layer_windows)} sliding layers capped at {windows[0]:,}"
    rows = [
        ("weights", gib(plan.weights_bytes), how_w),
        ("KV cache", gib(plan.kv_bytes), kv_how),
        ("activations", gib(plan.activation_bytes),
         f"{plan.max_num_batched_tokens:,} batched tokens, {min(plan.concurrency, plan.max_num_batched_tokens)} logit rows"),
        ("overhead", gib(plan.overhead_bytes), "CUDA context + allocator" if plan.device.kind == "gpu" else "runtime"),
        ("total", gib(plan.total_bytes), "everything on the device"),
        ("usable", gib(plan.usable_bytes),
         f"{plan.device.name}: {gib(plan.device.memory_bytes)} x {plan.gpu_memory_utilization:g}"),
    ]
    if cfg.num_experts and plan.weights_detail is not None:
        rows.insert(1, _experts_row(src, plan, cpu_moe))
    if plan.verdict == "partial_offload":
        rows += [(f"on device ({plan.gpu_layers}/{plan.num_layers} blocks)", gib(plan.device_total_bytes),
                  f"weights {gib(plan.device_weights_bytes)} + KV {gib(plan.device_kv_bytes)} + act + overhead"),
                 ("in RAM (offloaded)", gib(plan.host_bytes), "offloaded blocks + their KV")]
    return rows


def _verdict_line(plan: MemoryPlan) -> str:
    from ..plan.memory import gib

    why = VERDICT_TEXT.get(plan.verdict, "")
    if plan.verdict == "fits":
        why = f"{gib(plan.total_bytes)} of {gib(plan.usable_bytes)} usable, {gib(plan.usable_bytes - plan.total_bytes)} free"
    line = f"verdict: {plan.verdict} ({why})"
    if plan.verdict == "partial_offload":
        line += (f": --gpu-layers {plan.gpu_layers} of {plan.num_layers}, {plan.cpu_weight_read_fraction:.0%} of "
                 f"weight reads from RAM, ~{plan.slowdown:.1f}x slower decode (weight reads per token at "
                 f"{_bandwidth(plan.device.bandwidth_bytes_per_s)} on the device and "
                 f"{_bandwidth(plan.host_bandwidth_bytes_per_s)} from RAM, assumed)")
    if plan.verdict != "does_not_fit":
        line += (f"\nmax context at concurrency {plan.concurrency}: {plan.max_context:,} tokens; "
                 f"max concurrency at ctx {plan.ctx:,}: {plan.max_concurrency}")
    return line


def _bandwidth(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e12:.2f} TB/s" if bytes_per_s >= 1e12 else f"{bytes_per_s / 1e9:.0f} GB/s"


def _advice_lines(plan: MemoryPlan, advice: list[Advice]) -> list[str]:
    if not advice:
        return []
    head = "to make it fit" if not plan.ok else "to go further"
    lines = [f"advice ({head}, cheapest first):"]
    lines += [f"  {i}. {a.text}  [cost: {a.cost}]" for i, a in enumerate(advice, 1)]
    return lines


def _print_human(src: ModelSource, plan: MemoryPlan, advice: list[Advice], cpu_moe: int = 0) -> None:
    title = (f"hearth plan: {src.cfg.name or src.path} ({src.kind}), {plan.quant} weights, "
             f"{plan.num_layers} blocks, device {plan.device.name} "
             f"({plan.device.bandwidth_bytes_per_s / 1e12:.2f} TB/s)")
    rows = _rows(src, plan, cpu_moe)
    tail = [_verdict_line(plan), f"memory: {plan.figures().line()}"] + [f"warning: {w}" for w in plan.warnings] \
        + _advice_lines(plan, advice)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        width = max(len(r[0]) for r in rows)
        print(title)
        for name, size, how in rows:
            print(f"  {name:<{width}}  {size:>14}  {how}")
        print("\n".join(tail))
        return
    table = Table()
    table.add_column("item")
    table.add_column("size", justify="right")
    table.add_column("how")
    for name, size, how in rows:
        table.add_row(name, size, how, style="bold" if name in ("total", "usable") else None)
    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    console.print(title, markup=False)
    console.print(table)
    color = {"fits": "green", "kv_spills": "yellow", "partial_offload": "yellow"}.get(plan.verdict, "red")
    console.print(tail[0], style=color, markup=False)
    for line in tail[1:]:
        console.print(line, markup=False)


__all__ = ["add_parser", "build_plan", "run"]
