"""Start-up check: will the model fit the device? Computed from headers before any weight is loaded."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import OutOfMemoryError
from .advice import advise
from .memory import MemoryPlan, device_spec, make_plan
from .sources import resolve_model

log = logging.getLogger("hearthlm")

# the engine keeps weights in its compute dtype (GGUF blocks are dequantized at load)
_DTYPE_QUANT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def preflight(model_path: Path, device_type: str, dtype: str, max_model_len: int, max_num_batched_tokens: int,
              gpu_memory_utilization: float) -> MemoryPlan:
    """Plan one sequence of max_model_len on this device; raise OutOfMemoryError with advice if it cannot run."""
    src = resolve_model(str(model_path))
    cfg = src.cfg
    spec = device_spec("auto" if device_type == "cuda" else "cpu")
    ctx = min(max_model_len, cfg.max_position_embeddings)
    plan = make_plan(cfg, _DTYPE_QUANT.get(dtype, "bf16"), ctx=ctx, concurrency=1, device_bytes=spec,
                     gpu_memory_utilization=gpu_memory_utilization if device_type == "cuda" else 0.9,
                     max_num_batched_tokens=max_num_batched_tokens)
    if plan.verdict == "fits":
        return plan
    gib = 1 << 30
    lines = [f"{model_path.name} does not fit on {spec.name}: weights {plan.weights_bytes / gib:.2f} GiB + KV for "
             f"{ctx:,} tokens {plan.kv_bytes / gib:.2f} GiB + activations {plan.activation_bytes / gib:.2f} GiB "
             f"+ overhead {plan.overhead_bytes / gib:.2f} GiB = {plan.total_bytes / gib:.2f} GiB, but "
             f"{plan.usable_bytes / gib:.2f} GiB is usable ({plan.verdict}). Options:"]
    advice = [f"  - {a.flag}: {a.text}" for a in advise(cfg, plan)[:5]]
    if not advice:  # nothing the planner can trade inside this device: say what changes the device math
        if dtype == "float32":
            advice.append("  - dtype='bfloat16': halves the weights in memory")
        advice += ["  - --max-model-len: a shorter context shrinks the KV cache",
                   "  - a smaller or more quantized model (e.g. a Q4_K_M GGUF), or a machine with more memory"]
    lines += advice
    lines.append("  (run `hearth plan` for the full table)")
    raise OutOfMemoryError("\n".join(lines))
