"""`hearth quantize` (write a GGUF that llama.cpp reads) and `hearth perplexity` (validate it).

Exit codes: 0 done, 1 bad input (missing model or file, unknown target, empty text, ctx too large).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import HearthError

TARGET_NAMES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k", "f16", "f32"]


def add_parser(sub: Any) -> None:
    q = sub.add_parser("quantize", help="write a model as a quantized GGUF (llama.cpp-compatible)",
                       description="Quantize an HF model directory or a GGUF file (re-quantized from its "
                                   "dequantized weights) to a GGUF file that llama.cpp, transformers and hearthlm "
                                   "read. K-quant mixes follow llama.cpp (see hearthlm/quant/formats.py).")
    q.add_argument("model", help="HF model directory, .gguf file, store name or 'smollm2'")
    q.add_argument("--to", required=True, metavar="TYPE", help="|".join(TARGET_NAMES))
    q.add_argument("-o", "--output", required=True, help="output .gguf path")
    q.set_defaults(func=run_quantize)

    p = sub.add_parser("perplexity", help="sliding-window perplexity of a model on a text file",
                       description="Perplexity like llama-perplexity: the whole text is tokenized and scored in "
                                   "windows of --ctx tokens; each window after the first scores only the tokens "
                                   "it adds (its last --stride tokens).")
    p.add_argument("model", help="HF model directory, .gguf file, store name or 'smollm2'")
    p.add_argument("--file", "-f", required=True, help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default ctx/2)")
    p.add_argument("--batch", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many windows")
    p.add_argument("--llama-compat", action="store_true",
                   help="llama-perplexity's scheme: disjoint ctx chunks, BOS first, second half scored")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_perplexity)


def _fail(cmd: str, e: Exception) -> int:
    print(f"hearth {cmd}: error: {e}", file=sys.stderr)
    return 1


def run_quantize(args: argparse.Namespace) -> int:
    from ..loader import resolve_model_path
    from ..quant import quantize_model

    out = Path(args.output).expanduser()
    try:
        if args.to.lower() not in TARGET_NAMES:
            raise ValueError(f"--to {args.to!r} is not a known type: choose one of {', '.join(TARGET_NAMES)}")
        model = resolve_model_path(args.model)
        if not out.parent.is_dir():
            raise FileNotFoundError(f"output directory {out.parent} does not exist: create it first")
        tty = sys.stderr.isatty()
        progress = (lambda i, n, name, t: print(f"\r[{i + 1}/{n}] {name} -> {t}\033[K", end="", file=sys.stderr)) \
            if tty else None
        report = quantize_model(model, args.to.lower(), out, progress)
        if tty:
            print(file=sys.stderr)
    except (HearthError, ValueError, OSError) as e:
        return _fail("quantize", e)
    types = ", ".join(f"{t} x{n}" for t, n in report.types.most_common())
    print(f"wrote {out} ({report.arch}, {args.to}): {sum(report.types.values())} tensors [{types}], "
          f"{report.data_bytes / 2**20:.1f} MiB of weights, {report.bits_per_weight:.2f} bits/weight, "
          f"{report.seconds:.1f} s")
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    from ..quant import perplexity, perplexity_llm

    try:
        path = Path(args.file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} not found")
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise ValueError(f"text file {path} is empty: give it some text to score")
        for flag in ("ctx", "batch"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        if args.chunks is not None and args.chunks < 1:
            raise ValueError(f"--chunks must be >= 1, got {args.chunks}")
        llm = perplexity_llm(args.model, args.ctx, args.batch, args.dtype, args.device)
        tok = llm.tokenizer
        ids = tok.encode(text)
        bos = tok.bos_token_id
        adds_bos = bos is not None and tok.encode("a")[:1] == [bos]
        res = perplexity(llm, ids, args.ctx, args.ctx if args.llama_compat else args.stride, args.batch,
                         args.llama_compat, args.chunks, bos if adds_bos else None)
    except (HearthError, ValueError, OSError) as e:
        return _fail("perplexity", e)
    if args.json:
        print(json.dumps(dict(res.to_dict(), model=str(llm.engine.loaded.path),
                              quantization=llm.engine.loaded.quantization), indent=2))
        return 0
    loaded = llm.engine.loaded
    print(f"model {loaded.path.name} ({loaded.config.architecture}, {loaded.quantization}); text {path.name}: "
          f"{res.tokens:,} tokens; ctx {res.ctx}, stride {res.stride}, {res.windows} windows")
    print(f"PPL = {res.ppl:.4f} +/- {res.ppl_err:.4f}  ({res.tokens_scored:,} tokens scored, "
          f"{res.tokens_evaluated:,} evaluated in {res.seconds:.1f} s = {res.tokens_per_s:.0f} tok/s)")
    return 0


__all__ = ["add_parser", "run_perplexity", "run_quantize"]
