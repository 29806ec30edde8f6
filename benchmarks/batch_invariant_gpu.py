"""Cost and effect of --batch-invariant on CUDA (BENCHMARKS.md): a random bf16 model of a real shape, greedy.

For each mode (default, --batch-invariant), same run, same device:
  * decode tok/s at batch 1, 16 and 128 (128-token prompts, 128 new tokens; prefill time subtracted);
  * prefill tok/s for 16 prompts of 512 tokens;
  * invariance: 8 prompts generated alone, then the same 8 inside a batch of 64: identical sequences.
Usage: python benchmarks/batch_invariant_gpu.py [--preset llama-3.2-1b]
"""
from __future__ import annotations

import argparse
import time

import torch

from hearthlm import LLM, SamplingParams
from hearthlm.bench.models import build_pair


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (length,), generator=g).tolist() for _ in range(n)]


def timed(llm: LLM, batch: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(batch, sp, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]


def measure(llm: LLM, new: int) -> dict:
    row = {}
    for bs in (1, 16, 128):
        batch = prompts(bs, 128, bs)
        timed(llm, batch, 4)  # warm-up
        best = min(timed(llm, batch, new)[0] - timed(llm, batch, 1)[0] for _ in range(2))
        row[f"decode{bs}"] = bs * (new - 1) / best
    long = prompts(16, 512, 7)
    timed(llm, long, 1)
    row["prefill"] = 16 * 512 / min(timed(llm, long, 1)[0] for _ in range(2))
    probe = prompts(8, 100, 99)
    alone = [timed(llm, [p], 32)[1][0] for p in probe]
    batch = prompts(56, 60, 5)
    for i, p in enumerate(probe):
        batch.insert(8 * i, p)
    together = timed(llm, batch, 32)[1]
    row["same"] = sum(together[8 * i] == a for i, a in enumerate(alone))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()
    _, loaded = build_pair(args.preset, torch.bfloat16, torch.device("cuda"))
    rows = {}
    for mode in (False, True):
        llm = LLM(loaded=loaded, max_model_len=1024, max_num_seqs=128, batch_invariant=mode,
                  enable_prefix_caching=False)
        rows[mode] = measure(llm, args.new)
        del llm
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, preset {args.preset} (random bf16 weights)")
    print("| mode | decode b=1 tok/s | b=16 | b=128 | prefill 16x512 tok/s | 8 prompts alone = in a batch of 64 |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {'--batch-invariant' if mode else 'default'} | {r['decode1']:.0f} | {r['decode16']:.0f} | "
              f"{r['decode128']:.0f} | {r['prefill']:.0f} | {r['same']}/8 |")
    d, b = rows[False], rows[True]
    print("| invariant / default | " + " | ".join(f"{b[k] / d[k]:.2f}x" for k in
                                                  ("decode1", "decode16", "decode128", "prefill")) + " | |")


if __name__ == "__main__":
    main()
