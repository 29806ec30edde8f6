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
from .flags import add_engine_args, flag_name

TARGET_NAMES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k", "f16", "f32"]


def add_parser(sub: Any) -> None:
    q = sub.add_parser("quantize", help="write a model as a quantized GGUF (llama.cpp-compatible)",
                       description="Quantize an HF model directory or a GGUF file (re-quantized from its "
                                   "dequantized weights) to a GGUF file that llama.cpp, transformers and hearthlm "
                                   "read. K-quant mixes follow llama.cpp (see hearthlm/quant/formats.py).")
    q.add_argument("model", help="HF model directory, .gguf file, store name or 'smollm2'")
    q.add_argument("-q", "--quantization", default=None, metavar="TYPE",
                   help="the GGUF type to write (required): " + "|".join(TARGET_NAMES))
    q.add_argument("--to", dest="quantization", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    q.add_argument("-o", "--output", required=True, help="output .gguf path")
    q.set_defaults(func=run_quantize)

    p = sub.add_parser("perplexity", help="sliding-window perplexity of a model on a text file",
                       description="Perplexity like llama-perplexity: the whole text is tokenized and scored in "
                                   "windows of -c/--max-model-len tokens; each window after the first scores only "
                                   "the tokens it adds (its last --stride tokens).")
    p.add_argument("model", help="HF model directory, .gguf file, store name or 'smollm2'")
    p.add_argument("--file", "-f", required=True, help="UTF-8 text file")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default ctx/2)")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many windows")
    p.add_argument("--llama-compat", action="store_true",
                   help="llama-perplexity's scheme: disjoint ctx chunks, BOS first, second half scored")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_engine_args(p, only=("max_model_len", "max_num_seqs", "device", "dtype"),
                    defaults=dict(max_model_len=512, max_num_seqs=1),
                    kwargs={"max_num_seqs": {"type": int}},  # checked in run_perplexity: bad input exits 1
                    hidden={"max_num_seqs": ("--batch",)},
                    help=dict(max_model_len="tokens per window (llama.cpp's -c; default 512)",
                              max_num_seqs="windows scored together in one forward pass (default 1)",
                              dtype="auto (default: the engine's choice; on CPU GGUF weights stay quantized on the "
                                    "native kernel), float32 (the exact path, as llama-perplexity's f32), bfloat16, "
                                    "float16"))
    p.set_defaults(func=run_perplexity)


def _fail(cmd: str, e: Exception) -> int:
    print(f"hearth {cmd}: error: {e}", file=sys.stderr)
    return 1


def run_quantize(args: argparse.Namespace) -> int:
    from ..loader import resolve_model_path
    from ..quant import quantize_model

    out = Path(args.output).expanduser()
    try:
        target = (args.quantization or "").lower()
        if not args.quantization:
            raise ValueError(f"say which type to write with -q/--quantization TYPE: {', '.join(TARGET_NAMES)}")
        if target not in TARGET_NAMES:
            raise ValueError(f"--quantization {args.quantization!r} is not a known type: choose one of "
                             f"{', '.join(TARGET_NAMES)}")
        model = resolve_model_path(args.model)
        if not out.parent.is_dir():
            raise FileNotFoundError(f"output directory {out.parent} does not exist: create it first")
        report = quantize_model(model, target, out)  # a bar per tensor on a terminal (hearthlm.progress)
    except (HearthError, ValueError, OSError) as e:
        return _fail("quantize", e)
    types = ", ".join(f"{t} x{n}" for t, n in report.types.most_common())
    print(f"wrote {out} ({report.arch}, {target}): {sum(report.types.values())} tensors [{types}], "
          f"{report.data_bytes / 2**20:.1f} MiB of weights, {report.bits_per_weight:.2f} bits/weight, "
          f"{report.seconds:.1f} s")
    print("\n".join(report.breakdown()))
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
        if args.max_num_seqs < 1:
            raise ValueError(f"{flag_name(args, 'max_num_seqs')} must be >= 1, got {args.max_num_seqs}")
        if args.chunks is not None and args.chunks < 1:
            raise ValueError(f"--chunks must be >= 1, got {args.chunks}")
        device = args.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        ctx, batch = args.max_model_len, args.max_num_seqs
        llm = perplexity_llm(args.model, ctx, batch, args.dtype, device)
        tok = llm.tokenizer
        ids = tok.encode(text)
        bos = tok.bos_token_id
        adds_bos = bos is not None and tok.encode("a")[:1] == [bos]
        res = perplexity(llm, ids, ctx, ctx if args.llama_compat else args.stride, batch,
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
