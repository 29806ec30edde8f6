"""`hearth serve [model]`: OpenAI-, Ollama- and TGI-compatible HTTP server (binds 127.0.0.1 by default)."""
from __future__ import annotations

import argparse
import logging
import os
import re

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 11435
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def host_port(value: str | None = None) -> tuple[str, int]:
    """HEARTH_HOST ("127.0.0.1:11435", "0.0.0.0", ":8080", "http://host:port") -> (host, port)."""
    value = (value if value is not None else os.environ.get("HEARTH_HOST", "")).strip()
    value = re.sub(r"^https?://", "", value).rstrip("/")
    host, _, port = value.rpartition(":") if ":" in value else (value, "", "")
    return host or DEFAULT_HOST, int(port) if port else DEFAULT_PORT


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '1073741824' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M, 2G or a number of bytes")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower()))


def gpu_layers_arg(text: str) -> int | str | None:
    """--gpu-layers N|auto|-1 -> N, 'auto' or None (all blocks on the GPU)."""
    from ..config import normalize_gpu_layers
    from ..errors import InvalidRequestError

    try:
        return normalize_gpu_layers(text)
    except InvalidRequestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def utilization_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], e.g. 0.9; got {text!r}")
    return v


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """--kv-cache-dtype, --quantization, --gpu-layers and --gpu-memory-utilization, shared by `hearth serve` and
    `hearth run`."""
    p.add_argument("--gpu-memory-utilization", type=utilization_arg, default=0.9, metavar="F",
                   help="share of the GPU memory left after loading that the KV cache and a step's activations "
                        "may use (0.9); the KV pool is this share minus the peak of a profiled largest step")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="KV cache storage: auto (model dtype), fp8 or int8 (codes + a scale per token and head: "
                        "~1.9x the tokens of bf16), fp8_e4m3 (e4m3 without scales, as vLLM's fp8: 2x the tokens, "
                        "values beyond +-448 saturate; CUDA SM 8.9+)")
    p.add_argument("--quantization", default="none",
                   help="weight-only quantization of an HF safetensors model at load: none, int8 (groups of 32), "
                        "int4 (groups of 32, scale + min) or fp8 (e4m3, CUDA SM 8.9+); GGUF files are already "
                        "quantized")
    p.add_argument("--gpu-layers", type=gpu_layers_arg, default=None, metavar="N|auto",
                   help="layer offload (llama.cpp's -ngl): the last N blocks on the GPU, the others on the CPU from "
                        "RAM (slower decode: `hearth plan --gpu-layers N` estimates how much); auto = the most that "
                        "fit; default: all on the GPU. CUDA only")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    """--compile, shared by `hearth serve` and `hearth run`."""
    p.add_argument("--compile", action="store_true",
                   help="CPU: run decode steps through torch.compile (inductor C++ kernels; needs g++): the same "
                        "tokens, ~1.4x the batch-1 decode speed, but each batch-size range (1, 2-4, 5+ rows) "
                        "compiles on first use: ~30 s on 2 cores, ~5 s once inductor's disk cache has it. "
                        "Same as HEARTH_CPU_COMPILE=1")


def add_parser(sub) -> None:
    host, port = host_port()
    p = sub.add_parser("serve", help="serve a model over OpenAI, Ollama and TGI HTTP APIs")
    p.add_argument("model", nargs="?", default=None, help="model path, store name or alias (default: smollm2)")
    p.add_argument("--host", default=host, help=f"bind address (default {host}; env HEARTH_HOST=host:port)")
    p.add_argument("--port", type=int, default=port, help=f"port (default {port})")
    p.add_argument("--max-model-len", type=int, default=4096, help="context window per request (tokens)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--kv-cache-memory", type=parse_size, default=None, help="KV cache size, e.g. 512M, 2G")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    add_memory_args(p)
    add_compile_arg(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="auto",
                   help="auto, float32, float16, bfloat16. auto: bf16 on GPU; on CPU GGUF weights stay quantized (the "
                        "native kernel, several times float32's decode speed, batch-invariant); float32 is the exact "
                        "path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-alive", default="5m", help="unload after this idle time (Ollama style; -1 = never)")
    p.add_argument("--no-preload", action="store_true", help="load the model on the first request")
    p.add_argument("--stats-interval", type=float, default=10.0, help="seconds between engine stats log lines")
    p.add_argument("--quiet", action="store_true", help="no per-request and engine stats log lines")
    add_security_args(p)
    p.set_defaults(func=run)


def _csv_env(name: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


def _csv(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def add_security_args(p: argparse.ArgumentParser) -> None:
    """Auth, browser safety, limits and shutdown (SECURITY.md)."""
    g = p.add_argument_group("security")
    g.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on every route but /health (repeat or comma-separate "
                        "for several keys; env HEARTH_API_KEY)")
    g.add_argument("--insecure-no-auth", action="store_true",
                   help="allow binding a non-loopback address without --api-key (anyone who reaches it can use it)")
    g.add_argument("--allowed-hosts", action="append", default=None, metavar="HOST",
                   help="Host header names accepted besides localhost, IP literals and this machine's name "
                        "(defeats DNS rebinding; '*' accepts any)")
    g.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGIN",
                   help="browser Origins allowed besides http(s)://localhost, 127.0.0.1 and [::1] on any port "
                        "(like OLLAMA_ORIGINS; env HEARTH_ORIGINS; '*' allows any; patterns like https://*.example.com)")
    g.add_argument("--allow-local-paths", action="store_true",
                   help="let HTTP requests name local files or directories as models (off: store names, aliases, "
                        "HF repo ids and allowed URLs only)")
    g.add_argument("--allow-pull-host", action="append", default=None, metavar="HOST",
                   help="a host /api/pull may download from besides the Hugging Face Hub (loopback and private "
                        "addresses are refused unless listed here)")
    g.add_argument("--max-body-size", type=parse_size, default=4 << 20, metavar="SIZE",
                   help="largest request body (default 4M); larger ones get 413")
    g.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, how long in-flight requests may finish before they get an error event")


def config_from_args(args: argparse.Namespace):
    from ..serve.models import ServeConfig, parse_keep_alive

    return ServeConfig(model=args.model, host=args.host, port=args.port, max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_queue=args.max_queue, kv_cache_memory=args.kv_cache_memory,
                       enable_prefix_caching=not args.no_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
                       quantization=args.quantization, gpu_layers=args.gpu_layers,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       cpu_compile=getattr(args, "compile", False) or None, device=args.device,
                       dtype=args.dtype,
                       seed=args.seed, keep_alive_s=parse_keep_alive(args.keep_alive),
                       stats_interval_s=args.stats_interval, preload=not args.no_preload,
                       api_keys=_csv(args.api_key) or _csv_env("HEARTH_API_KEY"),
                       insecure_no_auth=args.insecure_no_auth, allowed_hosts=_csv(args.allowed_hosts),
                       allowed_origins=_csv(args.allowed_origins) or _csv_env("HEARTH_ORIGINS"),
                       allow_local_paths=args.allow_local_paths, allow_pull_hosts=_csv(args.allow_pull_host),
                       max_body_size=args.max_body_size, drain_timeout_s=args.drain_timeout)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..serve.lifecycle import run_server
    from ..serve.security import UnsafeBindError, check_bind

    cfg = config_from_args(args)
    try:
        check_bind(cfg)  # a non-loopback bind needs --api-key (or --insecure-no-auth), before anything loads
    except UnsafeBindError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.preload:
        from ..loader import resolve_model_path

        resolve_model_path(cfg.model)  # a clear "model not found" before the server starts
    hearth_log = logging.getLogger("hearthlm")
    if not args.quiet and hearth_log.getEffectiveLevel() > logging.INFO:
        hearth_log.setLevel(logging.INFO)
    # one line per request: the server's (hearthlm.serve, with dialect and status) replaces the engine's
    hearth_log.addFilter(lambda r: not (r.name == "hearthlm" and str(r.msg).startswith("request id=")))
    hearth_log.info("hearth serve on http://%s:%d (OpenAI /v1, Ollama /api, TGI /generate)", cfg.host, cfg.port)
    return run_server(cfg)  # binds first, loads in the background (503 meanwhile), drains on SIGTERM
