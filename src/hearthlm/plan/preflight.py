"""Start-up check: will the model fit the device? Computed from headers before any weight is loaded."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import OutOfMemoryError
from .advice import advise
from .memory import (
    MemoryFigures,
    MemoryPlan,
    WeightBytes,
    activation_bytes,
    device_spec,
    make_plan,
    overhead_bytes,
    system_memory_bytes,
    weights_bytes,
)
from .sources import resolve_model

log = logging.getLogger("hearthlm")

# the engine keeps HF weights in its compute dtype, GGUF blocks quantized on CPU (unless float32) and on CUDA as
# EngineConfig.weights (--weights) says
_DTYPE_QUANT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
# --quantization formats at load: the planner's formats of the same names (plan/memory.QUANT_BITS_PER_WEIGHT)
_LOAD_QUANTIZATIONS = ("int8", "int4", "fp8")


def planned_weights(cfg, src, device_type: str, dtype: str, quantization: str = "none",
                    requested_dtype: str | None = None, weights: str = "auto",
                    cpu_dense_memory: int | None = None) -> WeightBytes | None:
    """Weight bytes as the engine will hold them, or None (= `dtype` throughout): --quantization block matrices
    next to embeddings/head in `dtype`; a GGUF on CUDA kept quantized (the kernels' repacked sizes) when the
    loader keeps it so (loader.load.keep_quantized: --weights, or a bf16 copy too large for free memory);
    a GGUF on the CPU as its int4-kernel layout plus bf16 copies within `cpu_dense_memory` (sources.cpu_gguf_weights)
    unless the requested dtype (before `auto` was resolved) is float32."""
    dense = _DTYPE_QUANT.get(dtype, "bf16")
    if src.kind == "gguf" and src.tensor_types is not None and device_type == "cpu" and quantization == "none":
        import torch

        from ..loader.load import keep_quantized

        if keep_quantized(weights, requested_dtype or dtype, torch.device("cpu")):
            from ..layers.cpu_dense import dense_budget_bytes

            return src.cpu_weights(dense_budget_bytes(cpu_dense_memory))[0]
    if quantization in _LOAD_QUANTIZATIONS:
        d, q = weights_bytes(cfg, dense), weights_bytes(cfg, quantization)
        return WeightBytes(d.embedding_bytes, d.lm_head_bytes, q.layer_bytes, d.other_bytes, exact=False)
    if src.kind == "gguf" and src.gpu_weights is not None and device_type == "cuda" and dense != "f32":
        import torch

        from ..loader.load import keep_quantized

        if keep_quantized(weights, dtype, torch.device("cuda"), src.gpu_dense_bytes):
            return src.gpu_weights["quantized"]
        return src.gpu_weights["dense"]
    return None


def preflight(model_path: Path, device_type: str, dtype: str, max_model_len: int, max_num_batched_tokens: int,
              gpu_memory_utilization: float, kv_dtype: str = "auto", quantization: str = "none",
              gpu_layers: int | str | None = None, requested_dtype: str | None = None, weights: str = "auto",
              cpu_dense_memory: int | None = None) -> MemoryPlan:
    """Plan one sequence of max_model_len on this device; raise OutOfMemoryError with advice if it cannot run.

    gpu_layers (CUDA): N = the last N blocks on the GPU, the rest (and their KV) in RAM, checked against both;
    "auto" = the largest N that fits (plan.gpu_layers; verdict "fits" when all do). The engine loads
    `offloaded_layers(plan)` blocks on the device."""
    src = resolve_model(str(model_path))
    cfg = src.cfg
    on_gpu = device_type == "cuda"
    spec = device_spec("auto" if on_gpu else "cpu")
    ctx = min(max_model_len, cfg.max_position_embeddings)
    plan = make_plan(cfg, _DTYPE_QUANT.get(dtype, "bf16"), ctx=ctx, concurrency=1, device_bytes=spec,
                     gpu_memory_utilization=gpu_memory_utilization if on_gpu else 0.9,
                     max_num_batched_tokens=max_num_batched_tokens, kv_dtype=kv_dtype,
                     gpu_layers=gpu_layers if on_gpu else None,
                     weights=planned_weights(cfg, src, device_type, dtype, quantization, requested_dtype, weights,
                                             cpu_dense_memory),
                     host_bytes=system_memory_bytes() if on_gpu else None)
    if plan.ok:
        if plan.verdict == "partial_offload":
            log.info("--gpu-layers %s: %d of %d blocks on %s, the rest in RAM (%.2f GiB); expect ~%.1fx slower "
                     "decode (GPU %.2f TB/s, RAM %.0f GB/s assumed)", gpu_layers, plan.gpu_layers, plan.num_layers,
                     spec.name, plan.host_bytes / (1 << 30), plan.slowdown, spec.bandwidth_bytes_per_s / 1e12,
                     plan.host_bandwidth_bytes_per_s / 1e9)
        return plan
    gib = 1 << 30
    offload = ""
    if isinstance(gpu_layers, int) and plan.verdict == "partial_offload":
        offload = f"; with --gpu-layers {gpu_layers}, at most {plan.gpu_layers} blocks fit next to their KV"
    lines = [f"{model_path.name} does not fit on {spec.name}: weights {plan.weights_bytes / gib:.2f} GiB + KV for "
             f"{ctx:,} tokens {plan.kv_bytes / gib:.2f} GiB + activations {plan.activation_bytes / gib:.2f} GiB "
             f"+ overhead {plan.overhead_bytes / gib:.2f} GiB = {plan.total_bytes / gib:.2f} GiB, but "
             f"{plan.usable_bytes / gib:.2f} GiB is usable ({plan.verdict}){offload}. Options:"]
    advice = [f"  - {a.flag}: {a.text}" for a in advise(cfg, plan)[:5]]
    if not advice:  # nothing the planner can trade inside this device: say what changes the device math
        if dtype == "float32":
            advice.append("  - dtype='bfloat16': halves the weights in memory")
        advice += ["  - --max-model-len: a shorter context shrinks the KV cache",
                   "  - a smaller or more quantized model (e.g. a Q4_K_M GGUF), or a machine with more memory"]
    lines += advice
    lines.append("  (run `hearth plan` for the full table)")
    raise OutOfMemoryError("\n".join(lines))


def offloaded_layers(plan: MemoryPlan) -> int | None:
    """The engine's --gpu-layers after `preflight`: N when the plan offloads, else None (every block on the device)."""
    return plan.gpu_layers if plan.ok and plan.verdict == "partial_offload" else None


def engine_memory(engine) -> MemoryFigures:
    """The figures of a loaded engine (LLMEngine), in `hearth plan`'s terms: the weights and KV pools it holds
    (bytes of its tensors), a step's activations (the profiled peak on CUDA, else the plan's formula for its
    --max-num-batched-tokens and --max-num-seqs) and the runtime overhead. For the same settings on the CPU they
    equal `hearth plan --device cpu --ctx <max_model_len> --concurrency <max_num_seqs>`'s."""
    from ..loader.load import weight_bytes

    runner, sched = engine.runner, engine.config.scheduler
    act = getattr(runner, "activation_bytes", 0)
    if not act:
        dtype = str(runner.dtype).replace("torch.", "")
        act = activation_bytes(engine.model_config, sched.max_num_batched_tokens,
                               "f32" if dtype == "float32" else "bf16", sched.max_num_seqs)
    return MemoryFigures(weight_bytes(engine.loaded.model), runner.kv_cache_bytes, engine.kv_capacity_tokens, act,
                         overhead_bytes(engine.device.type))
