"""Profile host-side cost of decode steps (cProfile) on a random-weight preset, or time the CPU attention alone.

Usage: python benchmarks/profile_decode.py [preset] [batch]
       python benchmarks/profile_decode.py attention [batch 16] [min context 100] [max context 300] [kv dtype auto]
The attention mode runs one decode step's KV writes and attention (layers/attention.py, metadata from the runner,
scattered blocks, one pool per layer) for every layer of the default model (SmolLM2-135M: 30 layers, 9 query heads,
3 kv heads, head_dim 64) and prints the best of 15 steps: the attention share of a decode step, apart from the
matmuls. Run it pinned: `taskset -c 0,1 python benchmarks/profile_decode.py attention 16 100 300`.
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

from hearthlm import LLM, SamplingParams
from hearthlm.bench.models import build_pair


def attention(bs: int, lo: int, hi: int, kv_dtype: str) -> None:
    from hearthlm.layers.attention import paged_attention
    from hearthlm.runtime.runner import Batch

    llm = LLM(dtype="auto", device="cpu", max_model_len=1024, max_num_seqs=max(bs, 16), kv_cache_dtype=kv_dtype)
    runner, cfg = llm.engine.runner, llm.engine.runner.cfg
    g = torch.Generator().manual_seed(0)
    for pools in runner.kv_caches:
        for p in pools:
            parts = [p] if isinstance(p, torch.Tensor) else [p.codes.view(torch.uint8), p.scales]
            for t in parts:
                t.copy_(torch.randint(0, 100, t.shape, generator=g) if t.dtype == torch.uint8 else torch.rand(t.shape))
    starts = torch.randint(lo, hi, (bs,), generator=g).tolist()
    q = torch.randn(bs, cfg.num_heads, cfg.head_dim, generator=g)
    kv = torch.randn(bs, cfg.num_kv_heads, cfg.head_dim, generator=g)
    times = []
    for _ in range(15):
        blocks = (torch.randperm(runner.kv_caches[0][0].shape[0] - 1, generator=g) + 1).tolist()
        tables, used = [], 0
        for s in starts:
            need = -(-(s + 1) // runner.block_size)
            tables.append([blocks[used:used + need]] * len(runner.windows))
            used += need
        meta = runner.prepare(Batch([[5]] * bs, starts, tables, [None] * bs))[2]
        t = time.perf_counter()
        for i, pools in enumerate(runner.kv_caches):
            paged_attention(q, kv, kv, pools, meta, i, cfg.attn_scale, cfg.attn_logit_softcapping)
        times.append(time.perf_counter() - t)
    print(f"attention ({len(runner.kv_caches)} layers, KV writes included), batch {bs}, contexts {lo}-{hi}, "
          f"kv {kv_dtype}, {torch.get_num_threads()} threads: {min(times) * 1e3:.2f} ms a step (best of 15)")


def main() -> None:
    if sys.argv[1:2] == ["attention"]:
        a = sys.argv[2:]
        return attention(int(a[0]) if a else 16, int(a[1]) if len(a) > 1 else 100, int(a[2]) if len(a) > 2 else 300,
                         a[3] if len(a) > 3 else "auto")
    preset = sys.argv[1] if len(sys.argv) > 1 else "llama-3.2-1b"
    bs = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, loaded = build_pair(preset, torch.bfloat16 if dev.type == "cuda" else torch.float32, dev)
    llm = LLM(loaded=loaded, device=str(dev), max_model_len=2048, max_num_seqs=max(bs, 8))
    prompts = [[5 + i] * 128 for i in range(bs)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    sp = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    llm.generate(prompts, sp, use_tqdm=False)
    prof.disable()
    dt = time.perf_counter() - t
    print(f"{preset} batch {bs}: {256 / dt:.1f} steps/s (profiled)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
