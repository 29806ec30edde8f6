"""`hearth run [model] [prompt]`: one-shot answer or an interactive chat REPL, streaming.

Uses a running `hearth serve` (HEARTH_HOST, default 127.0.0.1:11435) when GET /health answers, else loads
the model in this process."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator


def add_parser(sub) -> None:
    from .serve_cmd import add_compile_arg, add_memory_args

    p = sub.add_parser("run", help="chat with a model (one-shot with a prompt, else interactive)")
    p.add_argument("model_or_prompt", nargs="*", help="[model] [prompt]; the model defaults to the embedded smollm2")
    p.add_argument("--model", "-m", default=None, help="model path, store name or alias")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--device", default="auto")
    add_memory_args(p)
    add_compile_arg(p)
    p.add_argument("--local", action="store_true", help="load the model in this process even if a server runs")
    p.set_defaults(func=run)


def _split_model_and_prompt(args) -> tuple[str | None, str | None]:
    from ..loader.load import DEFAULT_ALIASES
    from pathlib import Path

    words = list(args.model_or_prompt)
    model = args.model
    if model is None and words:
        first = words[0]
        looks_like_model = first.lower() in DEFAULT_ALIASES or Path(first).expanduser().exists() or (
            len(words) > 1 and " " not in first and ("/" in first or ":" in first or first.endswith(".gguf")))
        if looks_like_model:
            model = words.pop(0)
        else:
            from ..store import resolve_in_store

            if resolve_in_store(first) is not None:
                model = words.pop(0)
    return model, (" ".join(words) if words else None)


def _local_backend(args: argparse.Namespace, model: str | None) -> Callable[[list[dict]], Iterator[str]]:
    from .. import LLM, SamplingParams

    llm = LLM(model=model, max_model_len=args.max_model_len, device=args.device, max_num_seqs=4,
              kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization, gpu_layers=args.gpu_layers,
              gpu_memory_utilization=args.gpu_memory_utilization, cpu_compile=args.compile or None)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, truncate="left")

    def stream(history: list[dict]) -> Iterator[str]:
        ids, _keep, _dropped = llm.engine.chat_prompt(history, params)
        return llm.stream(ids, params)

    return stream


def _server_backend(args: argparse.Namespace, model: str | None) -> Callable[[list[dict]], Iterator[str]] | None:
    """Stream from a running `hearth serve` (GET /health answers quickly), else None."""
    from ..client import server_alive, server_url

    url = server_url()
    if not server_alive(url, timeout=0.3):
        return None
    try:
        from ..client import HearthClient, text_of
    except ImportError:  # httpx missing: load in-process
        return None
    from ..errors import ContextLengthError

    client = HearthClient(url, max_retries=2)
    params = {k: v for k, v in dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                    seed=args.seed).items() if v is not None}

    def stream(history: list[dict]) -> Iterator[str]:
        msgs = list(history)
        while True:
            try:
                chunks = client.chat(msgs, model=model, stream=True, **params)
                break
            except ContextLengthError:  # drop the oldest turn (the system prompt stays), like truncate="left"
                first = 1 if msgs[0]["role"] == "system" else 0
                if len(msgs) - first <= 1:
                    raise
                del msgs[first]
        return (text_of(c) for c in chunks)

    stream.url = url  # type: ignore[attr-defined]
    return stream


def run(args: argparse.Namespace) -> int:
    from ..errors import HearthError

    model, prompt = _split_model_and_prompt(args)
    backend = None if args.local else _server_backend(args, model)
    via = getattr(backend, "url", None)
    backend = backend or _local_backend(args, model)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def answer(text: str) -> None:
        history.append({"role": "user", "content": text})
        reply = []
        for delta in backend(history):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})

    if prompt is not None:
        answer(prompt)
        return 0
    if not sys.stdin.isatty():
        text = sys.stdin.read().strip()
        if text:
            answer(text)
        return 0
    if via:
        print(f"Using the hearth server at {via}.")
    print("Type a message; /bye to quit, /clear to forget the conversation.")
    while True:
        try:
            text = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return 0
        if text == "/clear":
            del history[len([m for m in history[:1] if m["role"] == "system"]):]
            continue
        try:
            answer(text)
        except HearthError as e:  # e.g. the server went away: say so and keep the session
            history.pop()
            print(f"\nerror: {e}", file=sys.stderr)
