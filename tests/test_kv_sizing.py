"""KV pool sizing: free device memory x --gpu-memory-utilization, minus what a profiled step needs."""
from __future__ import annotations

import pytest
import torch

from hearthlm.config import CacheConfig, SchedulerConfig
from hearthlm.errors import OutOfMemoryError
from hearthlm.plan.presets import preset_config
from hearthlm.runtime import kv_pools as R

GIB = 1 << 30


def _blocks(monkeypatch, free: int, activation: int, fraction: float = 0.9) -> int:
    monkeypatch.setattr(R, "available_memory_bytes", lambda device: free)
    cfg = preset_config("llama-3.1-8b")
    sched = SchedulerConfig(max_num_seqs=256, max_model_len=131072)
    return R.plan_num_blocks(cfg, CacheConfig(memory_fraction=fraction), sched, torch.bfloat16,
                             torch.device("cuda"), [None], activation_bytes=activation)[0]


def test_pool_is_free_memory_times_utilization_minus_the_profiled_step(monkeypatch):
    cfg = preset_config("llama-3.1-8b")
    per_block = R.kv_bytes_per_block(cfg, 16, torch.bfloat16) * cfg.num_layers  # 2 MiB: 16 tokens x 128 KiB
    assert _blocks(monkeypatch, 10 * GIB, 0) == int(10 * GIB * 0.9) // per_block
    assert _blocks(monkeypatch, 10 * GIB, 2 * GIB) == (int(10 * GIB * 0.9) - 2 * GIB) // per_block
    assert _blocks(monkeypatch, 10 * GIB, 2 * GIB, 0.5) == (5 * GIB - 2 * GIB) // per_block


def test_no_room_for_kv_after_activations_is_a_clear_error(monkeypatch):
    with pytest.raises(OutOfMemoryError, match="max-num-batched-tokens.*hearth plan"):
        _blocks(monkeypatch, 3 * GIB, 3 * GIB)


@pytest.mark.gpu
def test_gpu_profiled_step_fits_in_what_the_pool_left(tiny):
    """The engine profiles its largest step at start-up; the largest step then runs without growing the peak
    beyond free x utilization."""
    from hearthlm import LLM, SamplingParams

    torch.cuda.empty_cache()
    llm = LLM(model=tiny.path("llama"), dtype="bfloat16", device="cuda", max_model_len=1024, max_num_seqs=8,
              max_num_batched_tokens=1024)
    run = llm.engine.runner
    assert run.activation_bytes > 0
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    prompt = list(range(3, 1000))
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    step_peak = torch.cuda.max_memory_allocated() - before
    assert step_peak <= 1.25 * run.activation_bytes + (8 << 20), (step_peak, run.activation_bytes)


def test_gguf_on_cuda_stays_quantized_only_when_the_bf16_copy_would_crowd_the_device(monkeypatch):
    from hearthlm.loader import load

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (12 * GIB, 80 * GIB))
    cuda = torch.device("cuda")
    assert not load.keep_quantized(None, "auto", cuda, 4 * GIB)  # 1B-8B class in bf16 fits: cuBLAS
    assert load.keep_quantized(None, "auto", cuda, 10 * GIB)  # > 60% of free memory: stay quantized
    assert not load.keep_quantized("dequantize", "auto", cuda, 10 * GIB)


def test_profiling_step_that_runs_out_of_memory_is_a_clear_error(engine_for, monkeypatch):
    """A device too small for one step of the token budget: the typed error with advice, not CUDA's OOM."""
    runner = engine_for("llama").engine.runner
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner.model, "forward", oom)
    with pytest.raises(OutOfMemoryError, match="one step of 512 tokens.*--max-num-batched-tokens 512.*hearth plan"):
        R.profile_step_bytes(runner, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=1024))
