"""`hearth bench`: latency (batch-1 and batched decode, achieved bandwidth) and throughput workloads,
with an HF transformers baseline measured in the same process on the same device."""
from __future__ import annotations

import argparse
import random
import time

from .flags import QUANTIZATIONS, _choice, add_engine_args, engine_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure decode latency/throughput against an HF baseline")
    p.add_argument("mode", choices=["latency", "throughput", "prefix", "serving", "coldstart"])
    p.add_argument("--preset", default="llama-3.2-1b", help="random weights of a real shape (see hearth plan)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], metavar="N",
                   help="latency: the batch sizes (sequences decoded together) to measure, e.g. 1 16 64")
    p.add_argument("--batch", dest="batch_sizes", type=int, nargs="+", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-requests", type=int, default=256, help="throughput: requests")
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--baseline", choices=["none", "hf", "hf-cb"], default="none",
                   help="HF transformers in the same run: hf = generate (and, for throughput, its continuous "
                        "batching too); hf-cb = throughput against continuous batching only")
    p.add_argument("--hf-max-batch", type=int, default=16, help="HF baseline: largest batch it is run at")
    p.add_argument("--prefix-len", type=int, default=2000, help="prefix: shared system prompt tokens")
    p.add_argument("--url", default=None, help="serving: server base URL (default HEARTH_HOST or 127.0.0.1:11435)")
    p.add_argument("--concurrency", type=int, default=16, help="serving: concurrent clients")
    p.add_argument("--model", default=None, help="serving: model name; coldstart: saved model directory")
    add_engine_args(p, exclude=("gpu_layers",),
                    defaults=dict(max_num_seqs=256, max_num_batched_tokens=None),
                    kwargs={"quantization": {"type": _choice((*QUANTIZATIONS, "q4_k_m")),
                                             "metavar": "|".join((*QUANTIZATIONS, "q4_k_m"))}},
                    help=dict(max_num_batched_tokens="token budget of one step (default 16384 for throughput, as "
                                                     "vLLM's offline engine; else 8192)",
                              quantization="weights: none, int8, int4, fp8, or q4_k_m (Q4_K_M's GPU layout); the "
                                           "HF baseline stays dense",
                              dtype="auto (default: bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16"))
    p.set_defaults(func=run)


def _engine(args: argparse.Namespace, device, dtype, **over) -> dict:
    """LLM keyword arguments from the engine flags, for a model `build_pair` already loaded (its quantization)."""
    kw = {k: v for k, v in engine_kwargs(args).items() if k != "quantization"}
    kw.update(device=str(device), dtype=str(dtype).removeprefix("torch."),
              max_num_batched_tokens=args.max_num_batched_tokens or (16384 if args.mode == "throughput" else 8192))
    kw.update(over)
    return kw


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> int:
    if args.mode == "serving":
        from ..bench.serving import run_serving

        return run_serving(args)
    import torch

    # auto -> the concrete device and dtype the workloads (and bench/coldstart.py) use
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    if args.mode == "coldstart":
        from ..bench.coldstart import run_coldstart

        return run_coldstart(args)

    from .. import LLM, SamplingParams
    from ..bench.models import build_pair, copy_bandwidth, weight_bytes

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.perf_counter()
    hf, loaded = build_pair(args.preset, dtype, device, quantization=args.quantization)
    llm = LLM(loaded=loaded, **_engine(args, device, dtype))
    print(f"# hearth bench {args.mode} --preset {args.preset}: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}; engine ready in {time.perf_counter() - t0:.1f}s")
    rng = random.Random(0)
    vocab = loaded.config.vocab_size
    wbytes = weight_bytes(loaded)
    if args.mode == "latency":
        peak = copy_bandwidth(device) if device.type == "cuda" else None
        print("| batch | hearthlm tok/s | achieved GB/s (weights+KV) | HF tok/s | ratio |\n|---|---|---|---|---|")
        for bs in args.batch_sizes:
            prompts = [[rng.randrange(3, vocab) for _ in range(args.input_len)] for _ in range(bs)]
            sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
            # time decode only: prefill alone first, then the full run; the difference is output_len - 1 steps
            _sync()
            t = time.perf_counter()
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
            _sync()
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            _sync()
            decode = time.perf_counter() - t - prefill
            tps = bs * (args.output_len - 1) / decode
            kv_bytes = bs * (args.input_len + args.output_len / 2) * 2 * loaded.config.num_layers * \
                loaded.config.num_kv_heads * loaded.config.head_dim * torch.empty((), dtype=dtype).element_size()
            gbs = (wbytes + kv_bytes) * (args.output_len - 1) / decode / 1e9
            hf_tps = _hf_decode(hf, prompts, args.output_len, device) if args.baseline == "hf" and bs <= args.hf_max_batch else None
            bw = f"{gbs:,.0f}" + (f" ({100 * gbs * 1e9 / peak:.0f}% of copy {peak / 1e12:.2f} TB/s)" if peak else "")
            base = f"{hf_tps:,.1f} | {tps / hf_tps:.1f}x" if hf_tps else "- | -"
            print(f"| {bs} | {tps:,.0f} | {bw} | {base} |")
        return 0
    if args.mode == "prefix":
        return _prefix(args, loaded, rng)
    lens = [(rng.randint(args.min_len, args.max_len), rng.randint(args.min_len, args.max_len))
            for _ in range(args.num_requests)]
    prompts = [[rng.randrange(3, vocab) for _ in range(i)] for i, _ in lens]
    sps = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in lens]
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    _sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    _sync()
    dt = time.perf_counter() - t
    out_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    total = out_tok + sum(len(p) for p in prompts)
    print("| engine | requests | output tok/s | total tok/s |\n|---|---|---|---|")
    print(f"| hearthlm | {len(prompts)} | {out_tok / dt:,.0f} | {total / dt:,.0f} |")
    print(f"steps {llm.engine.stats.steps:,}; {dt:.1f}s")
    if args.baseline in ("hf", "hf-cb"):
        out_lens = [o for _, o in lens]
        try:
            cb = _hf_continuous(hf, prompts, out_lens)
            print(f"| HF transformers continuous batching (generate_batch manager) | {len(prompts)} | {cb:,.0f} | - |")
            print(f"ratio vs HF continuous batching (output tok/s): {out_tok / dt / cb:.1f}x")
        except Exception as e:  # the API moves between transformers releases
            print(f"HF continuous batching unavailable: {type(e).__name__}: {str(e)[:200]}")
    if args.baseline == "hf":
        hf_out = _hf_throughput(hf, prompts, out_lens, device, args.hf_max_batch)
        print(f"| HF transformers generate (static batches of {args.hf_max_batch}) | {len(prompts)} | {hf_out:,.0f} | - |")
        print(f"ratio vs HF static batches (output tok/s): {out_tok / dt / hf_out:.1f}x")
    return 0


def _hf_continuous(hf, prompts, out_lens) -> float:
    """HF transformers' continuous batching manager (what generate_batch runs), each request with its own
    max_new_tokens; output tok/s over the requested tokens."""
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=max(out_lens), eos_token_id=-1, pad_token_id=0)
    mgr = hf.init_continuous_batching(generation_config=gc)
    mgr.start()
    try:
        mgr.add_request(prompts[0], request_id="warmup", max_new_tokens=2)  # warm-up (graph capture) untimed
        if mgr.get_result(request_id="warmup", timeout=600) is None:
            raise RuntimeError("warm-up request produced no result")
        t = time.perf_counter()
        for i, (p, n) in enumerate(zip(prompts, out_lens)):
            mgr.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        done, tokens = set(), 0
        while len(done) < len(prompts):
            r = mgr.get_result(timeout=120)
            if r is None:
                raise RuntimeError("no result within 120 s")
            if r.is_finished() and r.request_id not in done:
                done.add(r.request_id)
                tokens += len(r.generated_tokens)
        _sync()
        return tokens / (time.perf_counter() - t)
    finally:
        mgr.stop(block=True, timeout=30)


def _hf_decode(hf, prompts, output_len: int, device) -> float:
    import torch

    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        hf.generate(ids, do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
        _sync()
        t = time.perf_counter()
        hf.generate(ids, do_sample=False, max_new_tokens=1, min_new_tokens=1, pad_token_id=0)
        _sync()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(ids, do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
        _sync()
    return len(prompts) * (output_len - 1) / (time.perf_counter() - t - prefill)


def _hf_throughput(hf, prompts, out_lens, device, batch: int) -> float:
    """HF generate over static batches (left-padded), counting only the requested output tokens."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]):] = 1
            n = max(out_lens[i] for i in idx)
            hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    _sync()
    return sum(out_lens) / (time.perf_counter() - t)


def _prefix(args, loaded, rng) -> int:
    """Mean TTFT of N requests sharing a long system prompt, with and without prefix caching."""
    import statistics

    from .. import LLM, SamplingParams

    vocab = loaded.config.vocab_size
    shared = [rng.randrange(3, vocab) for _ in range(args.prefix_len)]
    prompts = [shared + [rng.randrange(3, vocab) for _ in range(32)] for _ in range(args.num_requests)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    print("| prefix caching | requests | mean TTFT ms | p50 TTFT ms | prefix hit rate |\n|---|---|---|---|---|")
    means = {}
    for caching in (False, True):
        llm = LLM(loaded=loaded, **_engine(args, loaded.model.device, args.dtype, max_num_batched_tokens=8192,
                                           enable_prefix_caching=caching))
        llm.generate([shared[:64] + [5]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
        # the first request pays for the prefix; the rest arrive once it is cached (as in a chat service)
        llm.generate(prompts[:1], sp, use_tqdm=False)
        outs = llm.generate(prompts[1:], sp, use_tqdm=False)
        ttfts = [o.metrics["ttft_s"] * 1000 for o in outs]
        means[caching] = statistics.mean(ttfts)
        print(f"| {'on' if caching else 'off'} | {len(outs)} | {means[caching]:,.1f} | "
              f"{statistics.median(ttfts):,.1f} | {100 * llm.engine.kv.prefix_hit_rate:.0f}% |")
        del llm
    print(f"TTFT ratio (off / on): {means[False] / means[True]:.1f}x")
    return 0
