"""`hearth quantize` (write a GGUF that llama.cpp reads) and `hearth perplexity` (validate it).

Exit codes: 0 done, 1 bad input (missing model or file, unknown target, empty text, ctx too large, a quantized
source without --allow-requantize, a quality check that cannot run without --force / --no-eval), 2 quantize's
quality check failed (nothing written).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import HearthError
from .flags import add_engine_args, flag_name

DEFAULT_MAX_INCREASE = 10.0  # percent; see run_quantize
DEFAULT_TOKENS, DEFAULT_CTX = 2048, 512  # quant/guard.py's
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
    q.add_argument("--tensor-type", action="append", default=None, metavar="PATTERN=TYPE",
                   help="store the tensors matching PATTERN (a glob over llama.cpp names, e.g. blk.*.ffn_down or "
                        "output) as TYPE (f32|f16|q8_0|q4_0|q4_1|q5_0|q5_1|q4_k|q5_k|q6_k), over the target's mix; "
                        "repeatable, the last match wins (llama.cpp's --tensor-type)")
    q.add_argument("--allow-requantize", action="store_true",
                   help="accept a GGUF source whose tensors are already quantized (its errors add up), "
                        "as llama-quantize")
    g = q.add_argument_group("quality check", "the perplexity of the source and of the result are measured on "
                             "the same text, in float32 on the CPU; the file is written only when the increase is "
                             "at most --max-ppl-increase")
    g.add_argument("--eval-file", default=None, metavar="PATH",
                   help="UTF-8 text to measure on (default: the English prose of the Python documentation that "
                        "every Python install ships, pydoc_data.topics, in sorted topic order)")
    g.add_argument("--eval-tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                   help=f"tokens of the text scored (default {DEFAULT_TOKENS}, in windows of {DEFAULT_CTX})")
    g.add_argument("--max-ppl-increase", type=float, default=DEFAULT_MAX_INCREASE, metavar="PERCENT",
                   help=f"refuse to write when the perplexity rises by more than this (default "
                        f"{DEFAULT_MAX_INCREASE:g}%%: llama.cpp's q4_k_m mix passes on ~100M-parameter models)")
    g.add_argument("--force", action="store_true", help="write even when the check fails or cannot run (warns)")
    g.add_argument("--no-eval", action="store_true", help="skip the check and write")
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
    """Exit codes: 0 written, 1 bad input or the check cannot run (without --force / --no-eval), 2 the check
    failed (perplexity rose above --max-ppl-increase; nothing written without --force)."""
    from ..loader import resolve_model_path
    from ..quant import quantize_model
    from ..quant.guard import builtin_text, quantized_tensors
    from ..quant.sources import open_source
    from ..quant.writer import parse_tensor_types

    out = Path(args.output).expanduser()
    try:
        target = (args.quantization or "").lower()
        if not args.quantization:
            raise ValueError(f"say which type to write with -q/--quantization TYPE: {', '.join(TARGET_NAMES)}")
        if target not in TARGET_NAMES:
            raise ValueError(f"--quantization {args.quantization!r} is not a known type: choose one of "
                             f"{', '.join(TARGET_NAMES)}")
        overrides = parse_tensor_types(args.tensor_type)
        if args.max_ppl_increase < 0:
            raise ValueError(f"--max-ppl-increase must be >= 0 (percent), got {args.max_ppl_increase}")
        if args.force and args.no_eval:
            raise ValueError("--force and --no-eval together: --no-eval alone skips the check")
        text = None
        if not args.no_eval:
            text = _read_text(args.eval_file, "--eval-file") if args.eval_file is not None else builtin_text()
        model = resolve_model_path(args.model)
        if not out.parent.is_dir():
            raise FileNotFoundError(f"output directory {out.parent} does not exist: create it first")
        if out.exists() and model.exists() and out.resolve() == model.resolve():
            raise ValueError(f"output {out} is the input model: choose another -o path")
        if not args.allow_requantize and (quant := quantized_tensors(model)):
            raise ValueError(f"{model.name} is already quantized ({len(quant)} tensors, e.g. {quant[0]}): "
                             "quantizing it again adds the errors of both; pass --allow-requantize to do it anyway, "
                             "or quantize the F32/F16/BF16 original")
        open_source(model)  # a source quantize cannot convert fails here, before the evaluation
        if text is None:
            report = quantize_model(model, target, out, tensor_types=overrides)
        else:
            return _quantize_checked(args, model, target, out, overrides, text)
    except (HearthError, ValueError, OSError) as e:
        return _fail("quantize", e)
    _print_report(report, out, target)
    return 0


def _print_report(report: Any, out: Path, target: str) -> None:
    types = ", ".join(f"{t} x{n}" for t, n in report.types.most_common())
    print(f"wrote {out} ({report.arch}, {target}): {sum(report.types.values())} tensors [{types}], "
          f"{report.data_bytes / 2**20:.1f} MiB of weights, {report.bits_per_weight:.2f} bits/weight, "
          f"{report.seconds:.1f} s")
    print("\n".join(report.breakdown()))


def _quantize_checked(args: argparse.Namespace, model: Path, target: str, out: Path,
                      overrides: list[tuple[str, str]], text: str) -> int:
    """Quantize to a staging file beside `out`, measure both perplexities, then move it to `out` or delete it.

    The default limit, 10%: llama.cpp's q4_k_m mix costs ~100M-parameter models several times what it costs 7B
    ones (short rows fall back to Q5_0, few weights per layer); the limit lets that mix pass on the default model
    and stops a damaging type or tensor choice (figures: BENCHMARKS.md, "hearth quantize's quality check")."""
    import os

    from ..quant import quantize_model
    from ..quant.guard import GuardUnavailable, Evaluator, suggestion, worst_kinds

    staged = out.with_name(out.stem + ".unchecked.gguf")  # a .gguf name: the loader reads it by suffix
    try:
        try:
            ev = Evaluator.load(model, text, args.eval_tokens, DEFAULT_CTX)
            before = ev.ppl()
        except GuardUnavailable as e:
            if not args.force:
                raise ValueError(f"{e}; pass --force to write without the quality check, or --no-eval") from e
            print(f"hearth quantize: warning: {e}; writing without the quality check (--force)", file=sys.stderr)
            report = quantize_model(model, target, out, tensor_types=overrides)
            _print_report(report, out, target)
            return 0
        report = quantize_model(model, target, staged, tensor_types=overrides, measure_error=True)
        try:
            after = ev.ppl_of(staged)
        except GuardUnavailable as e:
            if not args.force:
                raise ValueError(f"{e}; pass --force to write without the quality check, or --no-eval") from e
            print(f"hearth quantize: warning: {e}; writing without the quality check (--force)", file=sys.stderr)
            os.replace(staged, out)
            _print_report(report, out, target)
            return 0
        change = 100.0 * (after.ppl / before.ppl - 1.0)
        print(f"perplexity on {len(ev.ids):,} tokens of "
              f"{Path(args.eval_file).name if args.eval_file else 'the built-in text (pydoc_data.topics)'}: "
              f"{before.ppl:.4f} before, {after.ppl:.4f} after, {change:+.1f}% "
              f"(limit +{args.max_ppl_increase:g}%)")
        if change > args.max_ppl_increase:
            types = {name: qtype for name, qtype, *_ in report.tensors}
            worst = worst_kinds(report.errors, types)
            named = ", ".join(f"{k} ({t}, {e:.1%} relative error)" for k, e, t in worst)
            hint = suggestion(worst)
            msg = (f"perplexity rose {change:+.1f}%, above --max-ppl-increase {args.max_ppl_increase:g}%; the "
                   f"tensors quantized worst: {named}" + (f"; try a higher-bit type for them: {hint}" if hint else
                                                           "; try a higher-bit -q"))
            if not args.force:
                print(f"hearth quantize: error: {msg}; {out} not written (--force writes it anyway)",
                      file=sys.stderr)
                return 2
            print(f"hearth quantize: warning: {msg}; writing anyway (--force)", file=sys.stderr)
        os.replace(staged, out)
    finally:
        if staged.exists():
            staged.unlink()
    _print_report(report, out, target)
    return 0


def _read_text(name: str, what: str) -> str:
    """A text file to score: FileNotFoundError / ValueError naming `what` when it is missing or empty."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{what} {path} is empty: give it some text to score")
    return text


def run_perplexity(args: argparse.Namespace) -> int:
    from ..quant import perplexity, perplexity_llm

    try:
        path = Path(args.file).expanduser()
        text = _read_text(args.file, "text file")
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
