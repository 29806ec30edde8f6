"""CPU decode benchmark: hearthlm vs HF transformers on the same weights, same process, same machine.

Usage: python benchmarks/cpu_decode.py [--model PATH] [--tokens 128] [--streams 16] [--dtype auto float32]
                                      [--repeats 3] [--no-hf] [--compile] [--cpu-kernel auto avx2 torch]
("auto" keeps GGUF weights quantized on CPU; "float32" dequantizes, matching HF token for token. --compile adds a
column per dtype with the torch.compile'd decode step (LLM(cpu_compile=True)); its "warm-up" row is the time to
compile both decode graphs, batch 1 and --streams rows: a cold inductor cache compiles, a warm one loads.)
Each hearthlm figure is the best of --repeats runs (batch 1 and the streams alternate), as the 2-core machines
this targets are shared and noisy; the load average is printed with the table. Run it pinned and otherwise idle:
`taskset -c 0,1 python benchmarks/cpu_decode.py`. (LLM(cpu_dense_memory=0), --cpu-dense-memory 0 on the CLI,
turns off the dense bf16 copies that multi-row CPU matmuls use, for A/B runs.)
Prints a Markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def bench_hearth(model, dtype: str, tokens: int, streams: int, repeats: int = 1,
                 compile: bool = False, cpu_kernel: str = "auto") -> tuple[float, float, float, float]:
    from hearthlm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, device="cpu", max_model_len=1024, max_num_seqs=max(16, streams),
              cpu_compile=compile, cpu_kernel=cpu_kernel)
    load = time.perf_counter() - t0
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompt = "Write a long story about a lighthouse keeper."
    prompts = [f"Story number {i}: once upon a time" for i in range(streams)]
    t0 = time.perf_counter()
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([prompt], warm, use_tqdm=False)  # warm-up (and with --compile: both decode graphs)
    if compile:
        llm.generate(prompts, warm, use_tqdm=False)
    warmup = time.perf_counter() - t0
    single = agg = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate([prompt], sp, use_tqdm=False)
        single = max(single, tokens / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        agg = max(agg, sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
    return load, warmup, single, agg


def bench_hf(model, tokens: int, streams: int) -> tuple[float, float, float, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hearthlm.loader import resolve_model_path

    p = resolve_model_path(model)
    t0 = time.perf_counter()
    kw = dict(gguf_file=p.name) if p.is_file() else {}
    root = str(p.parent if p.is_file() else p)
    hf = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, **kw).eval()
    tok = AutoTokenizer.from_pretrained(root, **kw)
    load = time.perf_counter() - t0
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def run(prompts):
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            hf.generate(**enc, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=tok.pad_token_id)

    t0 = time.perf_counter()
    run(["warm up"])
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(["Write a long story about a lighthouse keeper."])
    single = tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    run([f"Story number {i}: once upon a time" for i in range(streams)])
    agg = tokens * streams / (time.perf_counter() - t0)
    return load, warmup, single, agg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--dtype", nargs="+", default=["auto", "float32"])
    ap.add_argument("--repeats", type=int, default=3, help="hearthlm runs per figure; the best is reported")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile'd decode step per dtype")
    ap.add_argument("--cpu-kernel", nargs="+", default=["auto"],
                    help="a column per --cpu-kernel value (auto avx512vnni avx2 torch) and dtype")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    runs = [(dt, False) for dt in args.dtype] + ([(dt, True) for dt in args.dtype] if args.compile else [])
    results = {f"{dt}{' compiled' if c else ''}{'' if k == 'auto' else ' ' + k}":
               bench_hearth(args.model, dt, args.tokens, args.streams, args.repeats, c, k)
               for dt, c in runs for k in args.cpu_kernel}
    b = None if args.no_hf else bench_hf(args.model, args.tokens, args.streams)
    load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if b is None:
        print(f"device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
              f"{torch.__version__}; best of {args.repeats}; load average {load_avg}")
    else:
        import transformers

        print(f"device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
              f"{torch.__version__}, transformers {transformers.__version__}; HF float32 on the same GGUF; hearthlm "
              f"best of {args.repeats}; load average {load_avg}")
    cols = " | ".join(f"hearthlm {name}" for name in results)
    hf_cols = "" if b is None else " HF transformers | ratio (best / HF) |"
    print(f"| metric | {cols} |{hf_cols}\n|---|" + "---|" * (len(results) + (2 if b is not None else 0)))
    names = ["load (s)", "warm-up (s)", "decode tok/s, batch 1", f"aggregate tok/s, {args.streams} streams"]
    for i, name in enumerate(names):
        vals = [r[i] for r in results.values()]
        row = f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |"
        if b is not None:
            best = min(vals) if i < 2 else max(vals)
            ratio = b[i] / best if i < 2 else best / b[i]
            row += f" {b[i]:.2f} | {ratio:.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
