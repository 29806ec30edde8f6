"""The CPU KV pool follows the plan (max_model_len x max_num_seqs in blocks, the one KV formula of plan/memory.py),
capped by the memory share and by an explicit --kv-cache-memory; `hearth plan`, the engine's start-up log and
`hearth ps` (serve Loaded.size_bytes) give the same figures for the same settings."""
from __future__ import annotations

import argparse
import logging
import random
from types import SimpleNamespace

import pytest
import torch

from hearthlm.config import CacheConfig, SchedulerConfig
from hearthlm.engine.kv_cache import KVCacheManager
from hearthlm.engine.sequence import Sequence
from hearthlm.plan import memory as m
from hearthlm.plan.presets import preset_config
from hearthlm.runtime import kv_pools as R
from hearthlm.sampling import SamplingParams

CPU = torch.device("cpu")
GIB = 1 << 30


@pytest.fixture(scope="module")
def smollm2_256x4():
    """The default model on the CPU at max_model_len 256 x max_num_seqs 4, and its start-up log lines."""
    from hearthlm import LLM

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("hearthlm"), Keep(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        llm = LLM(device="cpu", max_model_len=256, max_num_seqs=4)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return llm, lines


def _plan(ctx: int, concurrency: int):
    from hearthlm.cli.plan_cmd import build_plan

    args = argparse.Namespace(model="smollm2", quant=None, ctx=str(ctx), concurrency=str(concurrency),
                              kv_cache_dtype="auto", gpu_memory_utilization="0.9", gpu_layers=None,
                              max_num_batched_tokens="2048", device="cpu", json=False)
    return build_plan(args)[1]


def test_cpu_pool_is_max_model_len_times_max_num_seqs(smollm2_256x4):
    llm, _ = smollm2_256x4
    engine, plan = llm.engine, _plan(256, 4)
    cfg = engine.model_config
    assert plan.kv_tokens == 256 * 4 == engine.kv_capacity_tokens  # 64 blocks of 16 for sequences
    assert engine.runner.num_blocks == [64 + 1]  # + the null block
    assert engine.runner.kv_cache_bytes == plan.kv_bytes == 65 * 16 * m.kv_bytes_per_token(cfg, "f32")
    cap = 0.9 * m.system_memory_bytes()
    assert engine.runner.kv_cache_bytes < cap  # under the memory share


def test_plan_log_and_ps_figures_agree(smollm2_256x4):
    from hearthlm.plan.preflight import engine_memory
    from hearthlm.serve.models import Loaded

    llm, lines = smollm2_256x4
    plan = _plan(256, 4)
    figures = engine_memory(llm.engine)
    assert figures == plan.figures()  # weights, KV pool (and its tokens), activations, overhead: byte for byte
    loaded = Loaded("smollm2", llm.engine.loaded.path, SimpleNamespace(engine=llm.engine), 1.0, None)
    assert loaded.size_bytes == plan.total_bytes == figures.total_bytes  # `hearth ps` MEMORY
    started = [line for line in lines if "loaded in" in line]
    assert started and f"memory: {plan.figures().line()}" in started[-1], started


def test_explicit_kv_cache_memory_and_num_blocks_win(monkeypatch):
    cfg = preset_config("smollm2-135m")
    sched = SchedulerConfig(max_num_seqs=4, max_model_len=256)
    per_block = R.kv_bytes_per_block(cfg, 16, torch.float32) * cfg.num_layers
    monkeypatch.setattr(R, "available_memory_bytes", lambda device: 64 * GIB)
    assert R.plan_num_blocks(cfg, CacheConfig(), sched, torch.float32, CPU, [None]) == [65]
    assert R.plan_num_blocks(cfg, CacheConfig(kv_cache_memory=20 * per_block), sched, torch.float32, CPU,
                             [None]) == [20]
    assert R.plan_num_blocks(cfg, CacheConfig(num_blocks=7), sched, torch.float32, CPU, [None]) == [7]


def test_explicit_kv_cache_memory_wins_in_the_engine():
    from hearthlm import LLM

    cfg = preset_config("smollm2-135m")
    per_block = R.kv_bytes_per_block(cfg, 16, torch.float32) * cfg.num_layers
    llm = LLM(device="cpu", max_model_len=256, max_num_seqs=4, kv_cache_memory=40 * per_block)
    assert llm.engine.runner.num_blocks == [40] and llm.engine.runner.kv_cache_bytes == 40 * per_block


def test_cpu_pool_is_capped_by_the_memory_share(monkeypatch):
    cfg = preset_config("smollm2-135m")
    sched = SchedulerConfig(max_num_seqs=64, max_model_len=4096)  # `hearth serve`'s defaults: 11.25 GiB asked
    per_block = R.kv_bytes_per_block(cfg, 16, torch.float32) * cfg.num_layers
    asked = m.kv_pool_blocks(cfg, 4096, 64)[None]
    assert asked == 64 * 256 + 1
    monkeypatch.setattr(R, "available_memory_bytes", lambda device: 4 * GIB)
    act = m.activation_bytes(cfg, 2048, "f32", 64)
    got = R.plan_num_blocks(cfg, CacheConfig(memory_fraction=0.5), sched, torch.float32, CPU, [None])[0]
    assert got == (2 * GIB - act) // per_block < asked
    monkeypatch.setattr(R, "available_memory_bytes", lambda device: 64 * GIB)
    assert R.plan_num_blocks(cfg, CacheConfig(), sched, torch.float32, CPU, [None]) == [asked]


def test_sliding_window_pools_use_the_plan_formula(monkeypatch):
    cfg = preset_config("gemma-2-2b")  # 13 sliding (4096) + 13 global layers
    sched = SchedulerConfig(max_num_seqs=3, max_model_len=8192, max_num_batched_tokens=512)
    windows = sorted(set(cfg.layer_windows), key=lambda w: (w is not None, w or 0))
    monkeypatch.setattr(R, "available_memory_bytes", lambda device: 1 << 50)
    got = R.plan_num_blocks(cfg, CacheConfig(), sched, torch.bfloat16, CPU, windows)
    want = m.kv_pool_blocks(cfg, 8192, 3, 16, 512)
    assert got == [want[w] for w in windows]
    assert want[None] == 3 * 512 + 1 and want[4096] == 3 * 257 + (289 - 257) + 1
    per_layer_token = 2 * cfg.num_kv_heads * cfg.head_dim * 2
    assert m.kv_pool_bytes(cfg, want, "bf16") == 13 * 16 * per_layer_token * (want[None] + want[4096])
    plan = m.make_plan(cfg, "bf16", 8192, 3, "bf16", m.DEVICE_PRESETS["h100"], max_num_batched_tokens=512)
    assert plan.kv_bytes == m.kv_pool_bytes(cfg, want, "bf16") and plan.kv_tokens == 3 * 8192


@pytest.mark.parametrize("window, chunk", [(24, 1), (24, 7), (16, 16), (37, 50), (64, 5)])
def test_sliding_window_peak_never_exceeds_the_formula(window, chunk):
    """Run sequences through the KV manager in steps of up to `chunk` tokens: the blocks a sliding-window group
    holds never exceed kv_blocks_per_seq, and reach it."""
    bs, n = 16, 300
    mgr = KVCacheManager([window, None], bs, [10_000, 10_000], enable_prefix_caching=False)
    rng = random.Random(window * 1000 + chunk)
    peak = 0
    for _ in range(4):
        seq = Sequence("r", 0, list(range(3, 3 + n)), SamplingParams(max_tokens=1), seed=0)
        while seq.num_computed_tokens < n:
            step = min(rng.randint(1, chunk), n - seq.num_computed_tokens)
            assert mgr.allocate(seq, step)
            held = sum(b != 0 for b in seq.kv.block_tables[1])  # groups: full attention, then the window
            peak = max(peak, held)
            assert held <= m.kv_blocks_per_seq(window, n, bs, chunk)
            seq.num_computed_tokens += step
        mgr.free(seq)
    assert peak >= m.kv_blocks_per_seq(window, n, bs, 1)
    assert mgr.blocks_needed(mgr.groups[1], n, chunk) == m.kv_blocks_per_seq(window, n, bs, chunk)
