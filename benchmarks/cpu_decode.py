"""CPU decode benchmark: hearthlm vs HF transformers on the same weights, same process, same machine.

Usage: python benchmarks/cpu_decode.py [--model PATH] [--tokens 128] [--streams 16] [--dtype auto float32]
("auto" keeps GGUF weights quantized on CPU; "float32" dequantizes, matching HF token for token.)
Prints a Markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch


def bench_hearth(model, dtype: str, tokens: int, streams: int) -> tuple[float, float, float]:
    from hearthlm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, device="cpu", max_model_len=1024, max_num_seqs=max(16, streams))
    load = time.perf_counter() - t0
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompt = "Write a long story about a lighthouse keeper."
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    llm.generate([prompt], sp, use_tqdm=False)
    single = tokens / (time.perf_counter() - t0)
    prompts = [f"Story number {i}: once upon a time" for i in range(streams)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    agg = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)
    return load, single, agg


def bench_hf(model, tokens: int, streams: int) -> tuple[float, float, float]:
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

    run(["warm up"])
    t0 = time.perf_counter()
    run(["Write a long story about a lighthouse keeper."])
    single = tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    run([f"Story number {i}: once upon a time" for i in range(streams)])
    agg = tokens * streams / (time.perf_counter() - t0)
    return load, single, agg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--dtype", nargs="+", default=["auto", "float32"])
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results = {dt: bench_hearth(args.model, dt, args.tokens, args.streams) for dt in args.dtype}
    b = bench_hf(args.model, args.tokens, args.streams)
    import transformers

    print(f"device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}, transformers {transformers.__version__}; HF float32 on the same GGUF")
    cols = " | ".join(f"hearthlm {dt}" for dt in args.dtype)
    print(f"| metric | {cols} | HF transformers | ratio (best / HF) |\n|---|" + "---|" * (len(args.dtype) + 2))
    names = ["load (s)", "decode tok/s, batch 1", f"aggregate tok/s, {args.streams} streams"]
    for i, name in enumerate(names):
        vals = [results[dt][i] for dt in args.dtype]
        best = min(vals) if i == 0 else max(vals)
        ratio = b[i] / best if i == 0 else best / b[i]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {b[i]:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
