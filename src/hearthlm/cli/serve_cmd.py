"""`hearth serve [model]`: OpenAI-, Ollama- and TGI-compatible HTTP server (binds 127.0.0.1 by default)."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

# the flag vocabulary lives in cli/flags.py; these names stay importable from here for older importers
from .flags import (add_compile_arg, add_engine_args, add_memory_args, engine_kwargs, gpu_layers_arg,  # noqa: F401
                    parse_size, utilization_arg)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 11435


def host_port(value: str | None = None) -> tuple[str, int]:
    """HEARTH_HOST ("127.0.0.1:11435", "0.0.0.0", ":8080", "http://host:port") -> (host, port)."""
    value = (value if value is not None else os.environ.get("HEARTH_HOST", "")).strip()
    value = re.sub(r"^https?://", "", value).rstrip("/")
    host, _, port = value.rpartition(":") if ":" in value else (value, "", "")
    return host or DEFAULT_HOST, int(port) if port else DEFAULT_PORT


def add_parser(sub) -> None:
    host, port = host_port()
    p = sub.add_parser("serve", help="serve a model over OpenAI, Ollama and TGI HTTP APIs")
    p.add_argument("model", nargs="?", default=None, help="model path, store name or alias (default: smollm2)")
    p.add_argument("--host", default=host, help=f"bind address (default {host}; env HEARTH_HOST=host:port)")
    p.add_argument("--port", type=int, default=port, help=f"port (default {port})")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the name(s) the API reports for the model and accepts in the `model` field (vLLM's "
                        "flag): the first is the one /v1/models, /api/tags and /api/ps show (default: the model "
                        "argument, or smollm2)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    add_engine_args(p, defaults=dict(max_num_seqs=None),
                    help=dict(max_num_seqs="sequences decoded together (llama.cpp's -np/--parallel, Ollama's "
                                           "OLLAMA_NUM_PARALLEL; default 64 on a GPU, 4 on the CPU, where the KV "
                                           "pool is max-model-len x this many tokens)"))
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

    eng = engine_kwargs(args)
    return ServeConfig(model=args.model, host=args.host, port=args.port, max_queue=args.max_queue,
                       served_model_name=list(args.served_model_name or []), **eng,
                       keep_alive_s=parse_keep_alive(args.keep_alive),
                       stats_interval_s=args.stats_interval, preload=not args.no_preload,
                       api_keys=_csv(args.api_key) or _csv_env("HEARTH_API_KEY"),
                       insecure_no_auth=args.insecure_no_auth, allowed_hosts=_csv(args.allowed_hosts),
                       allowed_origins=_csv(args.allowed_origins) or _csv_env("HEARTH_ORIGINS"),
                       allow_local_paths=args.allow_local_paths, allow_pull_hosts=_csv(args.allow_pull_host),
                       max_body_size=args.max_body_size, drain_timeout_s=args.drain_timeout)


def port_in_use(host: str, port: int) -> OSError | None:
    """The error a bind of host:port gives now (as uvicorn binds: SO_REUSEADDR), or None when it is free."""
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return None  # an unresolvable host: uvicorn says why
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return e
    return None


def run(args: argparse.Namespace) -> int:
    # a busy port fails first, in well under a second: before torch, uvicorn and the model are imported or loaded
    busy = port_in_use(args.host, args.port)
    if busy is not None:
        import errno

        why = (busy.strerror or str(busy)).lower()
        fix = ("another server (perhaps `hearth serve`) is using it: stop it, or pick another port with --port (or "
               "HEARTH_HOST)") if busy.errno == errno.EADDRINUSE else "pick another --port or --host"
        print(f"error: cannot listen on {args.host}:{args.port}: {why}; {fix}", file=sys.stderr)
        return 1
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
