"""Where GPU decode time goes: graph replay vs engine step, kernel breakdown, host profile of a busy batch.

Usage (CUDA machine): python benchmarks/gpu_profile.py [preset] [batch ...]
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

from hearthlm import LLM, SamplingParams
from hearthlm.bench.models import build_pair


def graph_replay_ms(llm: LLM, bs: int, iters: int = 200) -> float:
    graph = llm.engine.runner.graphs.graphs[bs][0]
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def kernel_table(llm: LLM, bs: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    graph = llm.engine.runner.graphs.graphs[bs][0]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "qwen3-0.6b"
    batches = [int(b) for b in sys.argv[2:]] or [1]
    dev = torch.device("cuda")
    _, loaded = build_pair(preset, torch.bfloat16, dev)
    llm = LLM(loaded=loaded, device="cuda", max_model_len=2048, max_num_seqs=max(max(batches), 8))
    for bs in batches:
        prompts = [[5 + i] * 128 for i in range(bs)]
        sp = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        step = (time.perf_counter() - t) / 256 * 1e3
        rep = graph_replay_ms(llm, bs)
        print(f"{preset} bs {bs}: engine step {step:.3f} ms, graph replay {rep:.3f} ms, host gap {step - rep:.3f} ms")
        kernel_table(llm, bs)
        prof = cProfile.Profile()
        prof.enable()
        llm.generate(prompts, sp, use_tqdm=False)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
