"""Quantized matmul kernels (kernels/quant_matmul.py) vs bf16 torch.matmul, on one CUDA GPU.

    python benchmarks/quant_matmul_bench.py            # the table (~1-2 min on an H100)
    python benchmarks/quant_matmul_bench.py --no-table --sweep --sweep-formats int4   # block-size sweeps
                                                       # (~3-5 min per format: one format per call)
    python benchmarks/quant_matmul_bench.py --no-table --mm-variants   # tl.dot kernel variants vs bf16

For each (N, K) and M: median time of triton.testing.do_bench (launches from Python, as eager prefill does)
and of do_bench_cudagraph (replayed from a CUDA graph, as decode steps run), achieved GB/s (bytes of W codes +
scales (+ mins) + x + y, over the graph time), and the speed-up vs bf16 torch.matmul. Formats:
  bf16   torch.matmul on a dense bf16 W (the baseline)
  int4   4-bit codes, group 32, fp16 scale + min       (Q4_0/Q4_1/Q4_K, --quantization int4)
  int8   int8 codes, group 32, fp16 scale              (Q8_0, --quantization int8)
  q6k    int8 codes, group 16, fp16 scale              (Q6_K)
  fp8    e4m3 W, per-channel scales, dynamic per-token x scales, torch._scaled_mm (SM 8.9+)
  <format>-a8  (M with a8.rows_supported) the int8-activation dp4a GEMV (kernels/quant_gemv_a8.py, the
         engine's decode path), its x quantization launch included; the plain <format> row is the float GEMV
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.testing

from hearthlm.kernels import quant_gemv_a8 as a8
from hearthlm.kernels import quant_matmul as qm
from hearthlm.layers.gpu_quant import Fp8Weight

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_matmul_variants import register  # noqa: E402

register()  # the benchmark-only tl.dot variants (1-8, 10-12) beside the product's

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)
MS = [1, 2, 4, 16, 128, 512]
FORMATS = {"int4": (4, 32, True), "int8": (8, 32, False), "q6k": (8, 16, False)}


def weight(n: int, k: int, bits: int, group: int, has_min: bool):
    lo, hi = (0, 16) if bits == 4 else (-128, 128)
    codes = qm.pack_codes(torch.randint(lo, hi, (n, k), device="cuda", dtype=torch.int32), bits)
    scale = (torch.rand(n, k // group, device="cuda") * 0.02).half()
    mins = (-torch.rand(n, k // group, device="cuda") * 0.1).half() if has_min else None
    return codes, scale, mins


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


L2_FLUSH_BYTES = 256 << 20  # > the L2 of any current GPU (H100: 50 MB)


def rotating(make, weight_bytes: int):
    """fn() running `make(i)()` over enough weight copies that each call reads W from HBM, not L2 (do_bench
    flushes L2 itself; the graph timing replays back-to-back calls and needs the copies)."""
    copies = [make(i) for i in range(max(1, min(32, -(-L2_FLUSH_BYTES // weight_bytes))))]
    state = {"i": 0}

    def fn():
        state["i"] += 1
        return copies[state["i"] % len(copies)]()

    return fn


def timed(fn) -> tuple[float, float]:
    """(do_bench median ms, do_bench_cudagraph median ms)."""
    eager = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    try:
        graph = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception:  # noqa: BLE001 - report eager only
        graph = float("nan")
    return eager, graph


def table(ms: list[int]) -> None:
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'N':>6} {'K':>6} {'M':>4} {'format':>6} {'eager us':>9} {'graph us':>9} {'GB/s':>7} {'vs bf16':>8}"
          f"  {'max rel err':>11}")
    for (n, k), m in itertools.product(SHAPES, ms):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)

        def dense(i):
            wi = w if i == 0 else w.clone()
            return lambda: torch.matmul(x, wi.t())

        base = timed(rotating(dense, nbytes(w)))
        rows = [("bf16", base, nbytes(w, x) + m * n * 2, 0.0)]
        for name, (bits, group, has_min) in FORMATS.items():
            codes, scale, mins = weight(n, k, bits, group, has_min)
            y = qm.quant_matmul(x, codes, scale, mins, bits, group)
            ref = qm.quant_matmul_ref(x.float(), codes, scale, mins, bits, group)
            err = float((y.float() - ref).abs().max() / ref.abs().max())

            def quant(i, bits=bits, group=group, ws=(codes, scale, mins)):
                c, s_, mn = ws if i == 0 else [t.clone() if t is not None else None for t in ws]
                return lambda: qm.quant_matmul(x, c, s_, mn, bits, group)

            t = timed(rotating(quant, nbytes(codes, scale, mins)))
            rows.append((name, t, nbytes(codes, scale, mins, x) + m * n * 2, err))
            if a8.rows_supported(m):
                y = a8.quant_gemv_a8_triton(x, codes, scale, mins, bits, group)
                err = float((y.float() - ref).abs().max() / ref.abs().max())

                def quant8(i, bits=bits, group=group, ws=(codes, scale, mins)):
                    c, s_, mn = ws if i == 0 else [t.clone() if t is not None else None for t in ws]
                    return lambda: a8.quant_gemv_a8_triton(x, c, s_, mn, bits, group)

                t = timed(rotating(quant8, nbytes(codes, scale, mins)))
                rows.append((name + "-a8", t, nbytes(codes, scale, mins, x) + m * n * 2, err))
            del codes, scale, mins
        if fp8:
            f = Fp8Weight.quantize(w)
            f(x)

            def fp8w(i):
                fi = f if i == 0 else Fp8Weight(f.w8.clone(), f.scale.clone(), f.dtype)
                fi._rowwise = f._rowwise
                return lambda: fi(x)

            t = timed(rotating(fp8w, nbytes(f.w8, f.scale)))
            rows.append(("fp8", t, nbytes(f.w8, f.scale, x) + m * n * 2, 0.0))
        for name, (eager, graph), b, err in rows:
            best = graph if graph == graph else eager
            base_best = base[1] if base[1] == base[1] else base[0]
            print(f"{n:>6} {k:>6} {m:>4} {name:>6} {eager * 1e3:>9.1f} {graph * 1e3:>9.1f} {b / best / 1e6:>7.0f} "
                  f"{base_best / best:>7.2f}x  {err:>11.2e}")
        torch.cuda.empty_cache()


def codes_w(ws) -> int:
    return ws[0].shape[1]


def sweep(formats: list[str], mm: bool = True, gemv: bool = True, mm_ms: tuple[int, ...] = (16, 128, 512),
          a8_sweep: bool = True, gemv_ms: tuple[int, ...] = (1, 2, 4)) -> None:
    """Best block sizes per shape: GEMVs (float and int8-activation) for M = 1, 2, 4; tl.dot kernel for M = 16,
    128, 512 (CUDA-graph times, W rotated through copies as in the table)."""
    print("\n# sweeps (graph us; best 3 of each grid)")

    def bench(call, ws):
        def make(i):
            c, s_, mn = ws if i == 0 else [t.clone() if t is not None else None for t in ws]
            return lambda: call(c, s_, mn)
        try:
            return triton.testing.do_bench_cudagraph(rotating(make, nbytes(*ws)), rep=30, return_mode="median")
        except Exception:  # noqa: BLE001 - e.g. out of registers/shared memory for this config
            return float("inf")

    def ranked(kernel, default, grid, x, ws, bits, group):
        """(time of default(x, ...), the 3 fastest (time, config) of kernel(x, ..., config) over grid)."""
        res = sorted(((bench(lambda c, s_, mn, cfg=cfg: kernel(x, c, s_, mn, bits, group, cfg), ws), cfg)
                      for cfg in grid), key=lambda r: r[0])
        return bench(lambda c, s_, mn: default(x, c, s_, mn, bits, group), ws), res[:3]

    for (n, k), name in itertools.product(SHAPES, formats):
        bits, group, has_min = FORMATS[name]
        ws = weight(n, k, bits, group, has_min)
        wbytes = nbytes(*ws)
        gemv_grids = []
        if gemv:  # the float GEMV
            gemv_grids.append(("gemv", qm.quant_gemv_triton, [
                qm.GemvConfig(bn, bw, warps, stages)
                for bn, bw, warps, stages in itertools.product([1, 2, 4, 8], [256, 512, 1024, 2048], [2, 4, 8], [1, 2])
                if 128 * warps <= bw <= 512 * warps and (stages == 1 or bw < codes_w(ws))]))
        if a8_sweep:  # the int8-activation GEMV
            gemv_grids.append(("gemv-a8", a8.quant_gemv_a8_triton, [
                a8.A8Config(bn, bw, warps, stages)
                for bn, bw, warps, stages in itertools.product([1, 2, 4, 8, 16], [64, 128, 256, 512, 1024],
                                                               [1, 2, 4, 8], [1, 2])
                if 128 * warps <= bn * bw <= 4096 * warps and (stages == 1 or bw < codes_w(ws) // 2)]))
        for (label, kernel, grid), m in itertools.product(gemv_grids, gemv_ms):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_def, best = ranked(kernel, kernel, grid, x, ws, bits, group)
            print(f"{label} {name} N={n} K={k} M={m}: default {t_def * 1e3:.1f}us ({wbytes / t_def / 1e6:.0f} GB/s); "
                  + "; ".join(f"{t * 1e3:.1f}us {type(c).__name__}({c.block_n}, {c.block_w}, {c.num_warps}, "
                              f"{c.num_stages}) ({wbytes / t / 1e6:.0f} GB/s)" for t, c in best))
        for m in mm_ms if mm else ():
            bms = [16] if m <= 16 else [32, 64, 128] if m <= 64 else [64, 128]
            grid = [qm.KernelConfig(bm, bn, bk, split, warps, stages)
                    for bm, bn, bk, split, warps, stages in itertools.product(
                        bms, [32, 64, 128], [64, 128, 256], [0, 1], [4, 8], [2, 4]) if bm <= m or bm == 16]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_def, best = ranked(qm.quant_mm_triton, qm.quant_matmul, grid, x, ws, bits, group)
            print(f"mm {name} N={n} K={k} M={m}: default {t_def * 1e3:.1f}us; "
                  + "; ".join(f"{t * 1e3:.1f}us bm={c.block_m} bn={c.block_n} bk={c.block_k} split={c.split_k} "
                              f"w={c.num_warps} s={c.num_stages}" for t, c in best))


def variant_grid(m: int, bits: int) -> list[qm.KernelConfig]:
    """Tiles tried for every variant at M rows besides mm_config's: (block_m, block_n, code words per K step,
    warps, stages, K splits (0: from the grid size))."""
    if m <= 16:
        tiles = [(16, 64, 64, 4, 4, 0), (16, 128, 64, 4, 3, 0), (16, 256, 64, 8, 3, 0), (16, 32, 64, 4, 4, 1),
                 (16, 64, 64, 4, 4, 1), (16, 128, 32, 4, 4, 0)]
    elif m <= 64:
        tiles = [(64, 64, 64, 4, 3, 0), (64, 128, 32, 4, 3, 0), (64, 128, 64, 8, 2, 0), (64, 256, 32, 8, 2, 0),
                 (32, 128, 64, 4, 3, 0), (64, 64, 64, 4, 3, 1)]
    else:
        tiles = [(64, 64, 64, 4, 3, 1), (64, 64, 32, 4, 3, 0), (128, 64, 64, 4, 3, 1), (128, 128, 64, 8, 3, 0),
                 (128, 128, 64, 8, 3, 1), (128, 256, 32, 8, 2, 0), (64, 64, 64, 4, 4, 1), (64, 128, 64, 4, 3, 1),
                 (128, 64, 64, 8, 4, 1), (128, 128, 64, 8, 4, 1), (64, 64, 64, 4, 3, 2), (128, 128, 32, 8, 4, 1)]
    return [qm.KernelConfig(bm, bn, bw * 16 // bits, sp, w, st) for bm, bn, bw, w, st, sp in tiles]


def mm_variants(formats: list[str], ms: tuple[int, ...], variants: list[int], rep: int = 8) -> None:
    """The tl.dot kernel's variants (qm.MM_VARIANTS; 0 = the default kernel) vs bf16 torch.matmul: per shape,
    format, M and variant the best CUDA-graph time over mm_config's tiles (with the variant) and variant_grid,
    W rotated through copies as in the table. Kernels are compiled up front, in parallel where triton has
    AsyncCompileMode. First, each variant's error against quant_matmul_ref on the first shape."""
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("# variants (see qm.MM_VARIANTS): 0 = _mm_kernel (default); " + "; ".join(
        f"{v} = {' '.join(f'{k}={int(x)}' for k, x in (qm.MM_VARIANT_BASE | flags).items())}"
        for v, flags in qm.MM_VARIANTS.items()))
    weights = {(sh, f): weight(*sh, *FORMATS[f]) for sh, f in itertools.product(SHAPES, formats)}
    xs = {(k, m): torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
          for (_, k), m in itertools.product(SHAPES, ms)}

    def configs(m, n, k, bits, v):
        base = qm.mm_config(m, n, k, bits)
        cfgs = [base] + [c for c in variant_grid(m, bits) if c != base]
        return [qm.KernelConfig(c.block_m, c.block_n, c.block_k, c.split_k, c.num_warps, c.num_stages, v)
                for c in cfgs]

    jobs = [(sh, f, m, cfg) for (sh, f), m in itertools.product(weights, ms) for v in variants
            for cfg in configs(m, *sh, FORMATS[f][0], v)]
    mode = getattr(triton, "AsyncCompileMode", None)
    if mode is not None:
        with ThreadPoolExecutor(os.cpu_count() or 4) as ex, mode(ex, ignore_errors=True):
            for sh, f, m, cfg in jobs:
                bits, group, _ = FORMATS[f]
                c, s_, mn = weights[sh, f]
                try:
                    qm.quant_mm_triton(xs[sh[1], m], c, s_, mn, bits, group, cfg, compile_only=True)
                except Exception:  # noqa: BLE001 - reported as inf when timed
                    pass
    print(f"# {len(jobs)} launches compiled")

    (n0, k0) = SHAPES[0]
    for f, m in itertools.product(formats, ms):
        bits, group, _ = FORMATS[f]
        c, s_, mn = weights[(n0, k0), f]
        x = xs[k0, m]
        ref = qm.quant_matmul_ref(x.float(), c, s_, mn, bits, group)
        errs = []
        for v in variants:
            y = qm.quant_mm_triton(x, c, s_, mn, bits, group, configs(m, n0, k0, bits, v)[0]).float()
            errs.append(f"{v}: {float((y - ref).abs().max()):.2e} ({float((y - ref).norm() / ref.norm()):.1e})")
        print(f"# max abs err (rel. norm) vs quant_matmul_ref, {f} N={n0} K={k0} M={m}, default tiles: "
              + "; ".join(errs))

    def graph_us(make, nbytes_w: int) -> float:
        try:
            return 1e3 * triton.testing.do_bench_cudagraph(rotating(make, nbytes_w), rep=rep, return_mode="median")
        except Exception:  # noqa: BLE001 - e.g. out of shared memory for this config
            return float("inf")

    print(f"{'N':>6} {'K':>6} {'M':>4} {'format':>6} {'var':>3} {'default':>8} {'best us':>8} {'vs bf16':>7}  "
          "best tiles (bm bn bk warps stages split)")
    best = {}
    for (n, k), m in itertools.product(SHAPES, ms):
        x = xs[k, m]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)

        def dense(i, w=w, x=x):
            wi = w if i == 0 else w.clone()
            return lambda: torch.matmul(x, wi.t())

        base = graph_us(dense, nbytes(w))
        print(f"{n:>6} {k:>6} {m:>4} {'bf16':>6} {'':>3} {base:>8.1f} {base:>8.1f} {1.0:>6.2f}x")
        for f in formats:
            bits, group, _ = FORMATS[f]
            ws = weights[(n, k), f]
            copies = [ws] + [[t.clone() if t is not None else None for t in ws]
                             for _ in range(max(1, min(32, -(-L2_FLUSH_BYTES // nbytes(*ws)))) - 1)]
            for v in variants:
                times = []
                for cfg in configs(m, n, k, bits, v):
                    def make(i, cfg=cfg, copies=copies, x=x, bits=bits, group=group):
                        c, s_, mn = copies[i % len(copies)]
                        return lambda: qm.quant_mm_triton(x, c, s_, mn, bits, group, cfg)

                    times.append((graph_us(make, nbytes(*ws)), cfg))
                t, cfg = min(times, key=lambda r: r[0])
                best.setdefault((n, k, m, f), []).append((t, v, cfg, base))
                print(f"{n:>6} {k:>6} {m:>4} {f:>6} {v:>3} {times[0][0]:>8.1f} {t:>8.1f} {base / t:>6.2f}x  "
                      f"{cfg.block_m} {cfg.block_n} {cfg.block_k} {cfg.num_warps} {cfg.num_stages} {cfg.split_k}")
        torch.cuda.empty_cache()
    print("\n# fastest variant per shape, M and format (us, vs bf16, tiles)")
    for (n, k, m, f), rows in best.items():
        t, v, cfg, base = min(rows, key=lambda r: r[0])
        print(f"{n:>6} {k:>6} {m:>4} {f:>6} {v:>3} {t:>8.1f} {base / t:>6.2f}x  {cfg.block_m} {cfg.block_n} "
              f"{cfg.block_k} {cfg.num_warps} {cfg.num_stages} {cfg.split_k}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="also sweep block sizes (prints the best configs)")
    ap.add_argument("--sweep-formats", default="int4,int8", help="formats the sweep covers (comma-separated)")
    ap.add_argument("--no-table", action="store_true", help="skip the main table (sweep only)")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="row counts of the table (comma-separated)")
    ap.add_argument("--no-mm-sweep", action="store_true", help="sweep the decode GEMV only")
    ap.add_argument("--no-gemv-sweep", action="store_true", help="skip the float GEMV sweep")
    ap.add_argument("--no-a8-sweep", action="store_true", help="skip the int8-activation GEMV sweep")
    ap.add_argument("--mm-ms", default=None, help="row counts of the tl.dot sweep (comma-separated; default "
                    "16,128,512) and of --mm-variants (default 16,64,128)")
    ap.add_argument("--gemv-ms", default="1,2,4", help="row counts of the GEMV sweeps (comma-separated)")
    ap.add_argument("--shapes", default=None, help="N x K shapes instead of the 8B ones, e.g. 1024x4096,6144x4096")
    ap.add_argument("--mm-variants", action="store_true", help="time the tl.dot kernel's variants (qm.MM_VARIANTS) "
                    "against bf16, each over a few tiles (~4 min on an H100 with all variants)")
    ap.add_argument("--variants", default=None, help="variants for --mm-variants (comma-separated; default all)")
    ap.add_argument("--variant-formats", default="int4,int8", help="formats for --mm-variants (comma-separated)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.shapes:
        SHAPES[:] = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    if not args.no_table:
        table([int(m) for m in args.ms.split(",")])
    if args.sweep:
        sweep(args.sweep_formats.split(","), mm=not args.no_mm_sweep, gemv=not args.no_gemv_sweep,
              mm_ms=tuple(int(m) for m in (args.mm_ms or "16,128,512").split(",")), a8_sweep=not args.no_a8_sweep,
              gemv_ms=tuple(int(m) for m in args.gemv_ms.split(",")))
    if args.mm_variants:
        mm_variants(args.variant_formats.split(","), tuple(int(m) for m in (args.mm_ms or "16,64,128").split(",")),
                    [int(v) for v in args.variants.split(",")] if args.variants else [0, *qm.MM_VARIANTS])
