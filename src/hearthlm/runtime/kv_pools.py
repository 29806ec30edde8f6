"""KV pool sizing: bytes per block, the block count per KV group from the memory plan and the device's budget,
and the activation profile of the largest step on CUDA (what the budget keeps free)."""
from __future__ import annotations

import logging

import torch

from ..config import CacheConfig, ModelConfig, SchedulerConfig
from ..errors import OutOfMemoryError
from ..kernels.kv_quant import bytes_per_slot_head

log = logging.getLogger("hearthlm")


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, cache_dtype: str = "auto") -> int:
    """Bytes of K and V for one block of one layer (fp8/int8: codes + float32 scales per slot and kv head)."""
    return 2 * block_size * cfg.num_kv_heads * bytes_per_slot_head(cfg.head_dim, cache_dtype, dtype)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from ..plan.memory import system_memory_bytes

    return system_memory_bytes()


def plan_num_blocks(cfg: ModelConfig, cache: CacheConfig, sched: SchedulerConfig, dtype: torch.dtype,
                    device: torch.device, windows: list[int | None], layers: list[int] | None = None,
                    offloaded: bool = False, activation_bytes: int = 0) -> list[int]:
    """Blocks per KV group (groups ordered as `windows`) for the pools of `layers` (default: all) on `device`.

    What is worth having comes from the plan (plan.memory.kv_pool_blocks, the one KV formula): max_num_seqs
    sequences of max_model_len tokens at their peak, plus the null block. That is the pool on the CPU, capped by
    the memory share: --kv-cache-memory when given, else CacheConfig.memory_fraction of the available RAM minus a
    step's activations (plan.memory.activation_bytes). On CUDA the pool is the share of the free device memory
    after loading, minus `activation_bytes` (profile_step_bytes), up to what is worth having.
    offloaded: the CPU pools of --gpu-layers' offloaded blocks, which the model cannot run without: half the free
    RAM (pages are touched only as blocks get used). A group with no layer on `device` gets what is worth having.
    cache.num_blocks: exactly that many blocks per group."""
    from ..plan.memory import activation_bytes as plan_activation_bytes, kv_pool_blocks

    bs = cache.block_size
    if cache.num_blocks is not None:
        return [cache.num_blocks] * len(windows)
    per_block = kv_bytes_per_block(cfg, bs, dtype, cache.cache_dtype)
    here = [cfg.layer_windows[i] for i in (range(cfg.num_layers) if layers is None else layers)]
    counts = {w: sum(1 for lw in here if lw == w) for w in windows}
    wanted = kv_pool_blocks(cfg, sched.max_model_len, sched.max_num_seqs, bs, sched.max_num_batched_tokens)
    budget = cache.kv_cache_memory
    if budget is None:
        if device.type == "cuda":
            free = available_memory_bytes(device)
            budget = int(free * cache.memory_fraction) - activation_bytes
            if budget < 2 * per_block * len(here):
                raise OutOfMemoryError(
                    f"after loading the weights {free / 2**30:.2f} GiB of device memory is free, and one step at "
                    f"--max-num-batched-tokens {sched.max_num_batched_tokens} needs {activation_bytes / 2**30:.2f} "
                    f"GiB of activations: nothing is left for the KV cache. Lower --max-num-batched-tokens or "
                    f"--max-num-seqs, raise --gpu-memory-utilization, offload layers (--gpu-layers) or use a "
                    f"smaller quantization (hearth plan shows what fits)")
        elif offloaded:
            budget = int(available_memory_bytes(device) * 0.5)
        else:  # CPU: the plan's pool, within the memory share left after a step's activations
            step = activation_bytes or plan_activation_bytes(
                cfg, sched.max_num_batched_tokens, "f32" if dtype == torch.float32 else "bf16", sched.max_num_seqs)
            budget = int(available_memory_bytes(device) * cache.memory_fraction) - step
    # sliding-window groups (bounded by their window) get what they are worth; full attention the rest of the budget
    out = {w: wanted[w] for w in windows}
    full_layers = counts.get(None, 0)
    if full_layers:
        spent = sum(out[w] * counts[w] * per_block for w in windows if w is not None)
        out[None] = min(wanted[None], max(2, (budget - spent) // (per_block * full_layers)))
    elif windows and counts[windows[0]]:  # only sliding layers: their pool within the budget
        w = windows[0]
        out[w] = min(wanted[w], max(2, budget // (per_block * counts[w])))
    return [int(out[w]) for w in windows]


def profile_step_bytes(runner, sched: SchedulerConfig) -> int:
    """Device memory the largest step needs beyond what is allocated now (CUDA): one forward over
    min(max_num_batched_tokens, max_model_len) prompt tokens (activations, attention workspaces), then logits and
    a softmax (the sampler's working copy) over max_num_seqs rows. Measured on scratch KV pools that are freed
    again (they are allocated before the baseline, so they do not count). runner: a ModelRunner."""
    from .runner import Batch

    dev = runner.device
    n = min(sched.max_num_batched_tokens, sched.max_model_len)
    blocks = -(-n // runner.block_size) + 1
    scratch = runner.scratch_pools(blocks)
    batch = Batch([[0] * n], [0], [[list(range(1, blocks))] * len(runner.windows)], [None])
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    try:
        with torch.inference_mode():
            ids, pos, meta, _ = runner.prepare(batch)
            hidden = runner.model.forward(ids, pos, meta, scratch)
            rows = hidden[-1:].expand(min(sched.max_num_seqs, 256), -1).contiguous()
            runner.model.compute_logits(rows).softmax(-1)
        torch.cuda.synchronize(dev)
    except torch.cuda.OutOfMemoryError:
        scratch.clear()
        torch.cuda.empty_cache()
        raise OutOfMemoryError(
            f"after loading the weights, one step of {n} tokens (--max-num-batched-tokens "
            f"{sched.max_num_batched_tokens}) does not fit in device memory: lower --max-num-batched-tokens or "
            f"--max-num-seqs, offload layers (--gpu-layers) or use a smaller quantization (hearth plan shows "
            f"what fits)") from None
    peak = torch.cuda.max_memory_allocated(dev) - base
    del scratch, ids, pos, meta, hidden, rows
    torch.cuda.empty_cache()
    log.debug("profiling step of %d tokens: %.1f MiB of activations", n, peak / 2**20)
    return peak
