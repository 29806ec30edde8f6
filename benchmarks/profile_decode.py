"""Profile host-side cost of decode steps (cProfile) on a random-weight preset.

Usage: python benchmarks/profile_decode.py [preset] [batch]
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

from hearthlm import LLM, SamplingParams
from hearthlm.bench.models import build_pair


def main() -> None:
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
