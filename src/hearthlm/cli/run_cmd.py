"""`hearth run [MODEL] [PROMPT...]`: a one-shot answer, or an interactive chat session (cli/repl.py), like
`ollama run`.

The first positional argument is always the model; an unknown one is an error, never a prompt. The prompt is the
rest of the arguments, everything after `--`, and/or standard input when it is not a terminal (stdin first, as
Ollama does); without any, the session is interactive. A running `hearth serve` (HEARTH_HOST, default
127.0.0.1:11435) answers when GET /health does and the model is a name (not a local path), else the model loads in
this process."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ContextLengthError, ModelNotFoundError
from ..sampling import SamplingParams
from .repl import Session, Timings, context_message

STDIN_GRACE_S = 1.0


class _RunParser(argparse.ArgumentParser):
    """Everything after the first `--` is prompt text (args.after_dashes), never a model name or a flag."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        after = None
        if "--" in args:
            i = args.index("--")
            args, after = args[:i], args[i + 1:]
        ns, rest = super().parse_known_args(args, namespace)
        ns.after_dashes = after
        return ns, rest


def add_parser(sub: Any) -> None:
    from .flags import add_engine_args

    p = sub.add_parser("run", help="chat with a model (one-shot with a prompt, else interactive)",
                       description="Chat with a model. Interactive: /? lists the commands, Ctrl-C stops an answer, "
                                   "Ctrl-D or /bye exits.")
    p.__class__ = _RunParser
    p.add_argument("model", nargs="?", default=None,
                   help="model: alias (smollm2), store name (`hearth list`) or path to a .gguf / HF directory")
    p.add_argument("prompt", nargs="*", help="one-shot prompt (also after `--`, or on standard input)")
    p.add_argument("--max-tokens", "--num-predict", "-n", type=int, default=None, dest="max_tokens",
                   help="answer length cap (default: until the model stops or the context is full)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=-1, help="-1 or 0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repeat-penalty", "--repetition-penalty", type=float, default=1.0, dest="repetition_penalty")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--verbose", action="store_true", help="print timings after each answer (stderr)")
    p.add_argument("--local", action="store_true", help="load the model in this process even if a server runs")
    # the shared engine flags (-c/--max-model-len, -t/--threads, --dtype, -ngl, ...); --seed above is the
    # answers' seed, not the engine's
    add_engine_args(p, exclude=("seed",), defaults=dict(max_num_seqs=4))
    p.set_defaults(func=run)


def check_model(name: str) -> None:
    """ModelNotFoundError unless `name` is an alias, a model in the store or an existing file or directory. A
    prompt given where the model goes is never stat'ed (it may be longer than a file name can be)."""
    from ..loader.load import DEFAULT_ALIASES
    from ..store import resolve_in_store
    from ..store.names import is_store_name

    n = name.strip()
    if n.lower() in DEFAULT_ALIASES or (is_store_name(n) and resolve_in_store(n) is not None):
        return
    if len(n.encode()) < 4096 and "\n" not in n:
        try:
            if Path(n).expanduser().exists():
                return
        except (OSError, ValueError):  # too long a name component, NUL bytes
            pass
    shown = n if len(n) <= 80 else n[:77] + "..."
    if is_store_name(n):
        fix = f"fetch it with `hearth pull {n}`, or see the models you have with `hearth list`"
    else:
        fix = (f"the first argument is the model: `hearth run smollm2 \"{shown}\"` asks the default model; "
               "`hearth list` shows the models you have, `hearth pull NAME` fetches one")
    raise ModelNotFoundError(f"model not found: {shown}\n  {fix}")


class LocalBackend:
    """The engine in this process; Ctrl-C sets a flag and the request is aborted between engine steps."""

    interrupt_raises = False
    url = None

    def __init__(self, args: argparse.Namespace, model: str | None):
        from .. import LLM

        start = time.perf_counter()
        from .flags import engine_kwargs

        kwargs = engine_kwargs(args)
        kwargs.pop("seed", None)  # args.seed is the answers' seed (SamplingParams), not the engine's
        self.llm = LLM(model=model, **kwargs)
        self.load_s = time.perf_counter() - start
        self.max_model_len: int | None = self.llm.engine.max_model_len

    def stream(self, messages: list[dict[str, str]], params: SamplingParams, timings: Timings) -> Iterator[str]:
        engine = self.llm.engine
        ids, _keep, _dropped = engine.chat_prompt(messages, params)
        rid = engine.add_request(ids, params)  # ContextLengthError when it does not fit: never truncated
        sent, first = 0, None
        try:
            while True:
                for out in engine.step():
                    if out.request_id != rid:
                        continue
                    if out.error is not None:
                        raise out.error
                    text, now = out.outputs[0].text, time.perf_counter()
                    n = len(out.outputs[0].token_ids)
                    if first is None and n:
                        first = now
                        timings.prompt_tokens = len(out.prompt_token_ids) - out.num_cached_tokens
                        timings.prompt_s = now - timings.started
                    timings.eval_tokens, timings.eval_s = n, now - (first or now)
                    timings.finish_reason = out.outputs[0].finish_reason
                    yield text[sent:]  # possibly "" (one item per step: the session checks Ctrl-C in between)
                    sent = len(text)
                    if out.finished:
                        return
                yield ""
        finally:
            engine.abort_request(rid)


class ServerBackend:
    """A running `hearth serve` (OpenAI dialect, streamed); Ctrl-C breaks the read and the connection is closed,
    which cancels the request on the server."""

    interrupt_raises = True

    def __init__(self, url: str, model: str | None):
        from ..client import HearthClient

        self.url: str | None = url
        self.model = model
        self.client = HearthClient(url, max_retries=2)
        self.max_model_len: int | None = None

    def model_name(self) -> str:
        """The model the server answers with (its first loaded one when none was named), for /show."""
        from ..errors import HearthError

        try:
            return self.model or next((m["id"] for m in self.client.models() if m.get("id")), "smollm2")
        except HearthError:
            return "smollm2"

    def stream(self, messages: list[dict[str, str]], params: SamplingParams, timings: Timings) -> Iterator[str]:
        from ..client import text_of

        body = {k: v for k, v in dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                      min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                                      presence_penalty=params.presence_penalty,
                                      frequency_penalty=params.frequency_penalty, seed=params.seed,
                                      stop=params.stop or None).items() if v is not None}
        # ContextLengthError from the client's /tokenize guard when it does not fit: never truncated
        chunks = self.client.chat(messages, model=self.model, max_tokens=params.max_tokens, stream=True,
                                  stream_options={"include_usage": True}, **body)
        first = None
        try:
            for chunk in chunks:  # type: ignore[union-attr]
                text, now = text_of(chunk), time.perf_counter()
                if text and first is None:
                    first = now
                    timings.prompt_s = now - timings.started
                timings.eval_tokens += bool(text)  # a chunk per token until the usage chunk counts them exactly
                for choice in chunk.get("choices") or []:
                    timings.finish_reason = choice.get("finish_reason") or timings.finish_reason
                if usage := chunk.get("usage"):
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    timings.prompt_tokens = int(usage.get("prompt_tokens", 0)) - int(cached)
                    timings.eval_tokens = int(usage.get("completion_tokens", 0))
                timings.eval_s = now - (first or now)
                yield text
        finally:
            chunks.close()  # type: ignore[union-attr]  # closes the HTTP response: the server stops generating


def _server(model: str | None, local: bool) -> str | None:
    """URL of a running hearth server to use, or None (--local, a model given by path, no server, no httpx)."""
    from ..client import server_alive, server_url
    from ..store.names import is_store_name

    if local or (model is not None and not is_store_name(model.strip())):
        return None
    url = server_url()
    if not server_alive(url, timeout=0.3):
        return None
    try:
        import httpx  # noqa: F401
    except ImportError:
        return None
    return url


def _stdin_text(wait: bool) -> str | None:
    """Standard input when it is not a terminal. With a prompt argument too (wait=False) it is read only if data or
    its end comes within STDIN_GRACE_S: an idle pipe inherited from a parent process is not waited on forever."""
    stdin = sys.stdin
    if stdin is None or stdin.isatty():
        return None
    if not wait:
        import select

        try:
            if not select.select([stdin], [], [], STDIN_GRACE_S)[0]:
                return None
        except (OSError, ValueError):
            return None
    return stdin.read()


def _prompt(args: argparse.Namespace) -> str | None:
    """The one-shot prompt: standard input (first, as Ollama does), then the words after the model and after `--`;
    None for an interactive session."""
    words = list(args.prompt) + list(getattr(args, "after_dashes", None) or [])
    piped = _stdin_text(wait=not words)
    if piped is None and not words:
        return None
    parts = [piped or "", " ".join(words)]
    return "\n".join(p.strip("\n") for p in parts if p.strip())


def run(args: argparse.Namespace) -> int:
    model = args.model
    if model is not None:
        check_model(model)
    params = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    SamplingParams(**params)  # InvalidRequestError for a bad flag, before loading anything
    prompt = _prompt(args)
    if prompt is not None and not prompt.strip():
        print("error: the prompt is empty: put it after the model (`hearth run smollm2 \"Hi\"`) or pipe it in; "
              "without one, from a terminal, the chat is interactive", file=sys.stderr)
        return 1
    url = _server(model, args.local)
    backend: LocalBackend | ServerBackend = ServerBackend(url, model) if url else LocalBackend(args, model)
    name = backend.model_name() if isinstance(backend, ServerBackend) else model or "smollm2"
    session = Session(backend, name, params, system=args.system, verbose=args.verbose)
    session.load_s = getattr(backend, "load_s", 0.0)
    if prompt is not None:
        try:
            return 0 if session.ask(prompt) else 130
        except ContextLengthError as e:
            print(f"error: {context_message(e, backend.max_model_len, interactive=False)}", file=sys.stderr)
            return 1
    if url:
        print(f"Using the hearth server at {url}.")
    print("Send a message (/? for help, Ctrl + d or /bye to exit).")
    return session.loop()
