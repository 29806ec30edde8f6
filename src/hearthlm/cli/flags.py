"""One flag vocabulary for every subcommand that builds an engine (serve, run, bench, perplexity, plan).

vLLM's names where vLLM has one, with the llama.cpp/Ollama spellings users type as aliases of the same
destination: `--max-model-len` (-c, --ctx-size), `--max-num-seqs` (-np, --parallel), `--gpu-layers` (-ngl,
--n-gpu-layers), `--quantization` (-q), `-t/--threads`. Older hearth spellings that meant the same thing
(`--ctx`, `--concurrency` in `hearth plan`, `--quant`, `--batch` in `hearth perplexity`) still parse but are
hidden from --help.

    add_engine_args(parser)            # the flags (a subset with only=..., other defaults with defaults=...)
    LLM(**engine_kwargs(args))         # keyword arguments for hearthlm.LLM

This module imports nothing heavy (no torch): building the `hearth` parser and printing --help stay fast.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from typing import Any

from ..config import CPU_KERNELS, GEMVS, KERNELS, WEIGHTS  # --cpu-kernel, --weights, --kernels, --gemv (no torch)

# --quantization at load (loader/load.py QUANTIZATIONS; tests/cli/test_flags.py keeps the two equal)
QUANTIZATIONS = ("none", "int8", "int4", "fp8")
# --kv-cache-dtype (config.KV_CACHE_DTYPES)
KV_CACHE_DTYPES = ("auto", "fp8", "int8", "fp8_e4m3")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
                  "bf16": "bfloat16"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


# ---------------- argparse types (their messages become "argument --flag: ...") ----------------
def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '1073741824' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M, 2G or a number of bytes")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower()))


def tokens_arg(text: str) -> int:
    """'8192', '8,192', '128k', '1m' -> a positive token count."""
    v = str(text).strip().lower().replace(",", "").replace("_", "")
    mult = {"k": 1024, "m": 1024 ** 2}.get(v[-1:], 1)
    try:
        n = float(v[:-1] if mult > 1 else v) * mult
    except ValueError:
        n = -1
    if n < 1 or n != int(n):
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens such as 8192 or 128k, got {text!r}")
    return int(n)


def positive_int(text: str) -> int:
    try:
        n = int(str(text).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return n


def gpu_layers_arg(text: str) -> int | str | None:
    """--gpu-layers N|auto|all|-1 -> N, 'auto' or None (all blocks on the GPU)."""
    from ..config import normalize_gpu_layers  # config.py is light (dataclasses only)
    from ..errors import InvalidRequestError

    try:
        return normalize_gpu_layers(text)
    except InvalidRequestError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--gpu-layers ")) from None


def utilization_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], e.g. 0.9; got {text!r}")
    return v


def _choice(choices: Iterable[str], aliases: dict[str, str] | None = None):
    names = tuple(choices)

    def parse(text: str) -> str:
        v = str(text).strip().lower().replace("-", "_")
        v = (aliases or {}).get(v, v)
        if v not in names:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(names)}")
        return v

    parse.__name__ = "choice"  # argparse's "invalid choice value" names the type
    return parse


quantization_arg = _choice(QUANTIZATIONS)
kv_cache_dtype_arg = _choice(KV_CACHE_DTYPES, {"fp8e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3"})
dtype_arg = _choice(DTYPES, _DTYPE_ALIASES)
cpu_kernel_arg = _choice(CPU_KERNELS, {"avx512_vnni": "avx512vnni", "avx512": "avx512vnni"})
weights_arg = _choice(WEIGHTS)
kernels_arg = _choice(KERNELS)
gemv_arg = _choice(GEMVS)


class _Store(argparse.Action):
    """store, remembering which spelling the user typed (flag_name), so later errors can name it."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        typed = dict(getattr(namespace, "_typed_flags", {}))
        typed[self.dest] = option_string
        setattr(namespace, "_typed_flags", typed)


def flag_name(args: argparse.Namespace, dest: str) -> str:
    """The spelling of an engine flag the user typed (`--ctx`, `-c`...), else its main name (`--max-model-len`)."""
    typed = getattr(args, "_typed_flags", {}).get(dest)
    return typed or (ENGINE_FLAGS[dest][0][0] if dest in ENGINE_FLAGS else "--" + dest.replace("_", "-"))


# ---------------- the flags ----------------
# dest -> (option strings shown in --help, hidden old spellings, add_argument keywords)
ENGINE_FLAGS: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, Any]]] = {
    "max_model_len": (("--max-model-len", "-c", "--ctx-size"), ("--ctx",), dict(
        type=tokens_arg, default=4096, metavar="N",
        help="context window per sequence in tokens, e.g. 8192 or 128k (llama.cpp's -c/--ctx-size; default "
             "%(default)s)")),
    "max_num_seqs": (("--max-num-seqs", "-np", "--parallel"), (), dict(
        type=positive_int, default=64, metavar="N",
        help="sequences decoded together (llama.cpp's -np/--parallel, Ollama's OLLAMA_NUM_PARALLEL; default "
             "%(default)s)")),
    "max_num_batched_tokens": (("--max-num-batched-tokens",), (), dict(
        type=tokens_arg, default=2048, metavar="N", help="token budget of one step (default %(default)s)")),
    "kv_cache_memory": (("--kv-cache-memory",), (), dict(
        type=parse_size, default=None, metavar="SIZE",
        help="KV cache size, e.g. 512M or 2G (default: the memory plan's share of free memory)")),
    "enable_prefix_caching": (("--no-prefix-caching",), (), dict(
        action="store_false", default=True, help="turn prefix caching off (on by default)")),
    "kv_cache_dtype": (("--kv-cache-dtype",), (), dict(
        type=kv_cache_dtype_arg, default="auto", metavar="|".join(KV_CACHE_DTYPES),
        help="KV cache storage: auto (model dtype), fp8 or int8 (codes + a scale per token and head: ~1.9x the "
             "tokens of bf16), fp8_e4m3 (e4m3 without scales, as vLLM's fp8: 2x the tokens, values beyond +-448 "
             "saturate; CUDA SM 8.9+)")),
    "quantization": (("--quantization", "-q"), (), dict(
        type=quantization_arg, default="none", metavar="QUANT",
        help="weight-only quantization of an HF safetensors model at load: none (default), int8 (groups of 32), "
             "int4 (groups of 32, scale + min) or fp8 (e4m3, CUDA SM 8.9+); GGUF files are already quantized")),
    "gpu_layers": (("--gpu-layers", "-ngl", "--n-gpu-layers"), (), dict(
        type=gpu_layers_arg, default=None, metavar="N|auto",
        help="layer offload (llama.cpp's -ngl): the last N blocks on the GPU, the others on the CPU from RAM "
             "(slower decode: `hearth plan --gpu-layers N` estimates how much); auto = the most that fit; "
             "default: all on the GPU. CUDA only")),
    "gpu_memory_utilization": (("--gpu-memory-utilization",), (), dict(
        type=utilization_arg, default=0.9, metavar="F",
        help="share of the GPU memory left after loading that the KV cache and a step's activations may use "
             "(default %(default)s); the KV pool is this share minus the peak of a profiled largest step")),
    "compile": (("--compile",), (), dict(
        action="store_true",
        help="CPU, float32 weights: run decode steps through torch.compile (inductor C++ kernels; needs g++): the "
             "same tokens, faster batch-1 decode (BENCHMARKS.md), but each batch-size range (1, 2-4, 5+ rows) "
             "compiles on first use (tens of seconds; inductor's disk cache serves later starts)")),
    "device": (("--device",), (), dict(default="auto", help="auto (default), cpu, cuda, cuda:1")),
    "dtype": (("--dtype",), (), dict(
        type=dtype_arg, default="auto", metavar="|".join(DTYPES),
        help="auto (default): bf16 on GPU; on CPU GGUF weights stay quantized (the native kernel, several times "
             "float32's decode speed, batch-invariant); float32 is the exact path")),
    "seed": (("--seed",), (), dict(type=int, default=0, help="engine seed for requests without one (default 0)")),
    "batch_invariant": (("--batch-invariant",), (), dict(
        action="store_true",
        help="CUDA: a request's tokens do not depend on the batch (fixed-tiling kernels; slower); the CPU default "
             "path is batch-invariant always")),
    "threads": (("-t", "--threads"), (), dict(
        type=positive_int, default=None, metavar="N",
        help="CPU threads for torch and the native kernel (llama.cpp's -t; default: the physical cores)")),
    "cpu_kernel": (("--cpu-kernel",), (), dict(
        type=cpu_kernel_arg, default="auto", metavar="|".join(CPU_KERNELS),
        help="CPU quantized kernel: auto (default: the best this CPU has), avx512vnni or avx2 (the native kernel, "
             "batch-invariant, the same bits on both), torch (PyTorch's int4 kernel, not batch-invariant)")),
    "weights": (("--weights",), (), dict(
        type=weights_arg, default="auto", metavar="|".join(WEIGHTS),
        help="GGUF weights on CUDA: auto (default: dequantized to bf16 when that copy fits the memory share, else "
             "kept quantized), quantized (always keep the file's quantized blocks), dequantize (always bf16)")),
    "kernels": (("--kernels",), (), dict(
        type=kernels_arg, default="auto", metavar="|".join(KERNELS),
        help="auto (default): Triton kernels on CUDA; torch: the torch reference ops everywhere (for A/B checks)")),
    "gemv": (("--gemv",), (), dict(
        type=gemv_arg, default="auto", metavar="|".join(GEMVS),
        help="decode-row matmuls on CUDA: auto (default: GEMV kernels for few rows, int8 activations for "
             "quantized weights where the GPU has dp4a), a16 (16-bit activations for quantized weights), off (also "
             "cuBLAS instead of the GEMV kernel for dense and FP8 weights)")),
    "cpu_dense_memory": (("--cpu-dense-memory",), (), dict(
        type=parse_size, default=1 << 30, metavar="SIZE",
        help="CPU: memory for 16-bit copies of int4 weights that multi-row steps (prefill, many streams) run "
             "through the dense GEMM, e.g. 512M; 0 = none (default 1G)")),
    "cpu_moe": (("--cpu-moe", "--n-cpu-moe", "-ncmoe"), (), dict(
        type=int, default=0, metavar="N",
        help="mixture-of-experts models on a GPU: keep the experts of the first N blocks on the CPU, the rest of the "
             "model on the GPU (llama.cpp's --n-cpu-moe; `hearth plan --cpu-moe N` shows the memory it moves); "
             "default 0")),
}

# engine flag dest -> hearthlm.LLM keyword
_LLM_KWARG = {"compile": "cpu_compile"}


def add_engine_args(p: argparse.ArgumentParser, *, only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                    defaults: dict[str, Any] | None = None, help: dict[str, str] | None = None,
                    hidden: dict[str, Iterable[str]] | None = None, kwargs: dict[str, dict[str, Any]] | None = None,
                    title: str = "engine") -> None:
    """Add the engine flags (ENGINE_FLAGS) to `p` in an argument group.

    only/exclude: the dests to add (default all); defaults: dest -> default for this command; help: dest -> help
    text for this command; hidden: dest -> extra old spellings this command accepts without listing them;
    kwargs: dest -> other add_argument keywords (type, metavar) for this command."""
    names = [d for d in (only or ENGINE_FLAGS) if d not in set(exclude)]
    group = p.add_argument_group(title, "flags shared by serve, run, bench, perplexity and plan")
    for dest in names:
        flags, old, kw = ENGINE_FLAGS[dest]
        kw = {**kw, **(kwargs or {}).get(dest, {})}
        if "action" not in kw:
            kw["action"] = _Store
        if defaults and dest in defaults:
            kw["default"] = defaults[dest]
        if help and dest in help:
            kw["help"] = help[dest]
        group.add_argument(*flags, dest=dest, **kw)
        old = (*old, *(hidden or {}).get(dest, ()))
        if old:  # hidden old spellings: same dest, no default of their own
            group.add_argument(*old, dest=dest, help=argparse.SUPPRESS,
                               **{**{k: v for k, v in kw.items() if k not in ("help", "metavar")},
                                  "default": argparse.SUPPRESS})


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for hearthlm.LLM(...) from the engine flags `args` has (commands may add a subset)."""
    out: dict[str, Any] = {}
    for dest in ENGINE_FLAGS:
        if hasattr(args, dest):
            if dest == "cpu_moe" and not getattr(args, dest):
                continue  # only when given: not every engine front takes it yet
            out[_LLM_KWARG.get(dest, dest)] = getattr(args, dest)
    return out


# ---------------- re-exports kept for older importers ----------------
def add_memory_args(p: argparse.ArgumentParser) -> None:
    """--gpu-memory-utilization, --kv-cache-dtype, --quantization and --gpu-layers (a subset of add_engine_args)."""
    add_engine_args(p, only=("gpu_memory_utilization", "kv_cache_dtype", "quantization", "gpu_layers"),
                    title="memory")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    """--compile (a subset of add_engine_args)."""
    add_engine_args(p, only=("compile",), title="compile")


__all__ = ["ENGINE_FLAGS", "add_compile_arg", "add_engine_args", "add_memory_args", "engine_kwargs", "flag_name",
           "gpu_layers_arg", "parse_size", "positive_int", "tokens_arg", "utilization_arg"]
