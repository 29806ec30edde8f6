"""`hearth run [model] [prompt]`: one-shot answer or an interactive chat REPL, streaming."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
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


def run(args: argparse.Namespace) -> int:
    from .. import LLM, SamplingParams

    model, prompt = _split_model_and_prompt(args)
    llm = LLM(model=model, max_model_len=args.max_model_len, device=args.device, max_num_seqs=4)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, truncate="left")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def answer(text: str) -> None:
        history.append({"role": "user", "content": text})
        ids, keep, dropped = llm.engine.chat_prompt(history, params)
        reply = []
        for delta in llm.stream(ids, params):
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
        answer(text)
