"""Decode GEMV (kernels/gemv.py) vs cuBLAS (torch.nn.functional.linear) at M = 1..8, bf16, one CUDA GPU.

    python benchmarks/gemv_bench.py                 # sweep + final table (~2-4 min on an H100)
    python benchmarks/gemv_bench.py --quick         # default config only (no sweep)
    OUT=/some/dir python benchmarks/gemv_bench.py   # per-config details also go to $OUT/gemv_sweep.txt

Every time is the median over graph replays of one CUDA graph holding `calls` back-to-back calls, each on a
different copy of W (copies total > 2x the 50 MB L2, so W streams from HBM as in a decode step), divided by
`calls`. GB/s = bytes of W / time. The sweep covers BLOCK_N 1..64 (powers of two), BLOCK_K 512..2048, num_warps
2/4/8, num_stages 1/2/4, pruned to BLOCK_K >= 256 * num_warps (x's layout a slice of W's: no shared-memory
conversion in the K loop), >= 1 program per SM, a per-thread register budget and the shared-memory limit;
kernels are compiled up front in parallel worker processes (Triton's disk cache).
Prints a compact table (shape, M, cuBLAS us, best Triton us, best config, default-config us) and a suggested
`gemv_config` table as Python.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {  # model: [(N, K)]
    "Qwen3-0.6B": [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (49152, 1024)],
    "Llama-3.2-1B": [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)],
    "Llama-3.1-8B": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
}
MS = [1, 2, 4, 8]
DTYPE = torch.bfloat16
ROTATE_BYTES = 100 << 20  # > 2x the H100 L2 (50 MB)
MIN_CALLS = 20


def configs(m: int, n: int, k: int, sms: int) -> list[tuple[int, int, int, int]]:
    """(block_n, block_k, num_warps, num_stages) worth timing for this shape."""
    out = []
    for bn, (bk, nw), ns in itertools.product([1, 2, 4, 8, 16, 32, 64],
                                              [(512, 2), (1024, 2), (1024, 4), (2048, 4), (2048, 8)], [1, 2, 4]):
        if bk > max(256 * nw, _pow2(k)) or -(-n // bn) < sms:
            continue
        vecs = bn * bk // (256 * nw)  # 16-byte W vectors per thread per step
        if vecs * (m + 4) > 160:  # fp32 accumulators + W registers
            continue
        if ns > 1 and (k < 2 * bk or ns * (bn + m) * bk * 2 > 200 << 10):
            continue
        out.append((bn, bk, nw, ns))
    return out


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _warm(job) -> str | None:
    """Compile one (m, n, k, cfg) in a worker (fills Triton's disk cache for the main process)."""
    m, n, k, (bn, bk, nw, ns) = job
    try:
        from hearthlm.kernels import gemv as gv
        from hearthlm.kernels._triton_utils import next_pow2

        gv._gemv_kernel.warmup(DTYPE, DTYPE, DTYPE, DTYPE, n, k, k, k, n, grid=(1,), BLOCK_M=m, P=next_pow2(m),
                               BLOCK_N=bn, BLOCK_K=bk, VEC=8, NUM_STAGES=ns, HAS_BIAS=False, ALIGNED=True,
                               num_warps=nw, num_stages=ns)
        return None
    except Exception as e:  # noqa: BLE001 - reported, the config is then skipped
        return f"{job}: {type(e).__name__}: {str(e)[:200]}"


def precompile(jobs: list, procs: int) -> None:
    keys, uniq = set(), []
    for m, n, k, cfg in jobs:  # N, K only matter through Triton's divisibility specialization: all are x16 here
        if (m, cfg) not in keys:
            keys.add((m, cfg))
            uniq.append((m, n, k, cfg))
    t = time.time()
    with mp.get_context("spawn").Pool(procs) as pool:
        errs = [e for e in pool.imap_unordered(_warm, uniq, chunksize=2) if e]
    print(f"# compiled {len(uniq)} kernels in {time.time() - t:.0f}s with {procs} processes"
          + (f"; {len(errs)} failed, e.g. {errs[0]}" if errs else ""), flush=True)


def graph_time(fn_for_copy, copies: int, reps: int = 15) -> float:
    """Median seconds per call: one CUDA graph of >= MIN_CALLS calls rotating over `copies` weight copies."""
    calls = max(MIN_CALLS, copies)
    fns = [fn_for_copy(i % copies) for i in range(calls)]
    for f in fns[:copies]:
        f()  # compile / cuBLAS heuristics outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / calls)
    del g
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="default config vs cuBLAS only (no sweep)")
    ap.add_argument("--procs", type=int, default=min(16, os.cpu_count() or 1), help="compile worker processes")
    ap.add_argument("--models", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    args = ap.parse_args()

    import triton

    from hearthlm.kernels import gemv as gv

    torch.manual_seed(0)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    out_dir = os.environ.get("OUT")
    log = open(os.path.join(out_dir, "gemv_sweep.txt"), "w") if out_dir else None  # noqa: SIM115
    head = f"# {torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}"
    print(head, flush=True)
    if log:
        print(head, file=log)
    shapes = [(model, n, k) for model in args.models.split(",") for n, k in SHAPES[model]]
    sweep = {} if args.quick else {(m, n, k): configs(m, n, k, sms) for _, n, k in shapes for m in MS}
    if sweep:
        precompile([(m, n, k, c) for (m, n, k), cs in sweep.items() for c in cs], args.procs)

    rows, best_cfgs = [], {}
    t0 = time.time()
    for model, n, k in shapes:
        wbytes = n * k * 2
        copies = max(2, -(-ROTATE_BYTES // wbytes))
        ws = [torch.randn(n, k, device=dev, dtype=DTYPE) / k ** 0.5 for _ in range(copies)]
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=DTYPE)
            ref = gv.gemv_ref(x, ws[0])
            err = float((gv.gemv(x, ws[0]).float() - ref.float()).norm() / ref.float().norm())
            t_cublas = graph_time(lambda i, ws=ws, x=x: (lambda w=ws[i]: F.linear(x, w)), copies)
            t_def = graph_time(lambda i, ws=ws, x=x: (lambda w=ws[i]: gv.gemv_triton(x, w)), copies)
            best_t, best_c = t_def, ("default", gv.gemv_config(m, n, k))
            for bn, bk, nw, ns in sweep.get((m, n, k), []):
                def mk(i, c=(bn, bk, nw, ns), ws=ws, x=x):
                    return lambda w=ws[i]: gv.gemv_triton(x, w, block_n=c[0], block_k=c[1], num_warps=c[2],
                                                          num_stages=c[3])
                try:
                    t = graph_time(mk, copies, reps=7)
                except Exception as e:  # noqa: BLE001 - e.g. out of resources
                    if log:
                        print(f"{model} N={n} K={k} M={m} {(bn, bk, nw, ns)} failed: {e}", file=log)
                    continue
                if log:
                    print(f"{model} N={n} K={k} M={m} bn={bn} bk={bk} w={nw} s={ns}: {t * 1e6:.2f}us "
                          f"{wbytes / t / 1e9:.0f}GB/s vs cuBLAS {t_cublas / t:.2f}x", file=log)
                if t < best_t:
                    best_t, best_c = t, ("sweep", gv.GemvConfig(bn, bk, nw, ns))
            best_cfgs[(m, n, k)] = best_c[1]
            rows.append((model, n, k, m, t_cublas, best_t, best_c[1], t_def, err))
            line = (f"{model:>12} {n:>6} {k:>6} {m:>2} {t_cublas * 1e6:>8.2f} {best_t * 1e6:>8.2f} "
                    f"{wbytes / best_t / 1e9:>6.0f} {t_cublas / best_t:>6.2f}x  {t_def * 1e6:>8.2f} "
                    f"{t_cublas / t_def:>6.2f}x  {_cfg(best_c[1]):<18} {err:.1e}")
            if log:
                print(line, file=log, flush=True)
        ws.clear()
        torch.cuda.empty_cache()

    print(f"# sweep + timing {time.time() - t0:.0f}s; times = median us per call (CUDA-graph replays, W from HBM)")
    print(f"{'model':>12} {'N':>6} {'K':>6} {'M':>2} {'cuBLAS':>8} {'best':>8} {'GB/s':>6} {'speedup':>7}  "
          f"{'default':>8} {'speedup':>7}  {'best config bn/bk/w/s':<18} {'rel err':>7}")
    for model, n, k, m, tc, tb, cfg, td, err in rows:
        print(f"{model:>12} {n:>6} {k:>6} {m:>2} {tc * 1e6:>8.2f} {tb * 1e6:>8.2f} {n * k * 2 / tb / 1e9:>6.0f} "
              f"{tc / tb:>6.2f}x  {td * 1e6:>8.2f} {tc / td:>6.2f}x  {_cfg(cfg):<18} {err:.1e}")
    geo = statistics.geometric_mean
    print(f"# geomean speed-up vs cuBLAS: best {geo([r[4] / r[5] for r in rows]):.2f}x, "
          f"default {geo([r[4] / r[7] for r in rows]):.2f}x")
    if not args.quick:
        print("\n# suggested table for kernels/gemv.py (measured on this GPU):")
        print("_TUNED: dict[tuple[int, int, int], GemvConfig] = {  # (M, N, K) -> config")
        for (m, n, k), c in sorted(best_cfgs.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
            print(f"    ({m}, {n}, {k}): GemvConfig({c.block_n}, {c.block_k}, {c.num_warps}, {c.num_stages}),")
        print("}")
    if log:
        log.close()


def _cfg(c) -> str:
    return f"{c.block_n}/{c.block_k}/{c.num_warps}/{c.num_stages}"


if __name__ == "__main__":
    sys.exit(main())
