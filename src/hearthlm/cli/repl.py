"""The `hearth run` chat session, shaped like `ollama run`: streaming answers, Ctrl-C stops an answer (not the
session), slash commands (/? /set /show /clear /bye), multi-line input between triple quotes, --verbose timings.

A backend streams one answer for a conversation; run_cmd.py provides one that runs the engine in this process and
one that talks to a running `hearth serve`."""
from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from ..errors import ContextLengthError, HearthError, InvalidRequestError
from ..sampling import SamplingParams, renamed

EXIT_HINT = "Use Ctrl + d or /bye to exit."
MULTILINE = '"""'

# `/set parameter NAME VALUE`: Ollama's names (and our SamplingParams names) -> (field, parser, help)
PARAMETERS: dict[str, tuple[str, type, str]] = {
    "seed": ("seed", int, "Random number seed"),
    "num_predict": ("max_tokens", int, "Max number of tokens to predict (-1 = until the model stops)"),
    "top_k": ("top_k", int, "Pick from top k num of tokens (0 = off)"),
    "top_p": ("top_p", float, "Pick token based on sum of probabilities"),
    "min_p": ("min_p", float, "Pick token based on top token probability * min_p"),
    "temperature": ("temperature", float, "Set creativity level (0 = greedy)"),
    "repeat_penalty": ("repetition_penalty", float, "How strongly to penalize repetitions (1 = off)"),
    "presence_penalty": ("presence_penalty", float, "Penalize tokens already present"),
    "frequency_penalty": ("frequency_penalty", float, "Penalize tokens by how often they appeared"),
    "stop": ("stop", list, "Set the stop parameters"),
}
ALIASES = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}
# error messages name the field as the user typed it
WIRE_NAMES = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command

Use \"\"\" to begin a multi-line message.
Ctrl + c stops an answer; Ctrl + d or /bye exits."""
SET_HELP = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set verbose           Show timings after each answer
  /set quiet             Hide them"""
SHOW_HELP = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template"""


@dataclass
class Timings:
    """One answer's timings, as `ollama run --verbose` prints them."""

    started: float = field(default_factory=time.perf_counter)
    load_s: float = 0.0
    prompt_tokens: int = 0  # evaluated (prefix-cache hits excluded)
    prompt_s: float = 0.0  # until the first token
    eval_tokens: int = 0
    eval_s: float = 0.0  # after the first token
    total_s: float = 0.0  # load included
    finish_reason: str | None = None  # "stop" | "length" | None (interrupted, unknown)

    def report(self) -> str:
        def rate(n: int, s: float) -> str:
            return f"{n / s:.2f} tokens/s" if s > 0 else "n/a"

        rows = [("total duration", _duration(self.total_s)), ("load duration", _duration(self.load_s)),
                ("prompt eval count", f"{self.prompt_tokens} token(s)"),
                ("prompt eval duration", _duration(self.prompt_s)),
                ("prompt eval rate", rate(self.prompt_tokens, self.prompt_s)),
                ("eval count", f"{self.eval_tokens} token(s)"), ("eval duration", _duration(self.eval_s)),
                # the first token comes out of the prompt's evaluation: the rate counts the ones after it
                ("eval rate", rate(max(0, self.eval_tokens - 1), self.eval_s))]
        return "\n".join(f"{k + ':':<22}{v}" for k, v in rows)


def _duration(s: float) -> str:
    return f"{s:.3f}s" if s >= 1 else f"{s * 1e3:.3f}ms" if s >= 1e-3 else f"{s * 1e6:.1f}µs"


class Backend(Protocol):
    """Streams the answer to a conversation; closing the iterator early cancels the generation."""

    interrupt_raises: bool  # Ctrl-C raises KeyboardInterrupt into the stream (a blocking read), else sets a flag
    max_model_len: int | None
    url: str | None

    def stream(self, messages: list[dict[str, str]], params: SamplingParams, timings: Timings) -> Iterator[str]: ...


def parse_parameter(name: str, words: list[str], current: dict[str, Any]) -> tuple[str, Any]:
    """(SamplingParams field, value) for `/set parameter NAME VALUE...`, checked by SamplingParams' own validation
    together with the other current values; InvalidRequestError naming the parameter as typed."""
    key = ALIASES.get(name, name)
    if key == "num_ctx":
        raise InvalidRequestError("num_ctx cannot change in a running session: restart with "
                                  "`hearth run MODEL -c N` (--max-model-len)", param="num_ctx")
    if key not in PARAMETERS:
        raise InvalidRequestError(f"unknown parameter {name!r}: one of {', '.join(PARAMETERS)}", param=name)
    fld, kind, _ = PARAMETERS[key]
    if not words:
        raise InvalidRequestError(f"{name} needs a value: /set parameter {name} <value>", param=name)
    if kind is list:
        value: Any = list(words)
    else:
        try:
            value = kind(words[0])
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise InvalidRequestError(f"{name} must be {what}, got {words[0]!r}", param=name) from None
        if fld == "max_tokens" and value == -1:
            value = None  # Ollama's -1: until the model stops or the context is full
    try:
        SamplingParams(**{**current, fld: value})
    except InvalidRequestError as e:
        raise renamed(e, WIRE_NAMES) from None
    return fld, value


class Session:
    """One conversation: messages, the system prompt, sampling parameters; prints to `out` (timings to `err`)."""

    def __init__(self, backend: Backend, model: str, params: dict[str, Any], system: str | None = None,
                 verbose: bool = False, out: TextIO | None = None, err: TextIO | None = None):
        SamplingParams(**params)  # a bad flag fails before the first question
        self.backend, self.model, self.params = backend, model, dict(params)
        self.system, self.verbose = system, verbose
        self.messages: list[dict[str, str]] = []
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.load_s = 0.0  # charged to the first answer's timings, then 0

    def conversation(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def ask(self, text: str) -> bool:
        """Stream the answer to `text`; False when Ctrl-C stopped it (a newline is printed either way). The turn
        stays in the conversation, a partial answer included (as Ollama does); a refused one (HearthError) not."""
        timings = Timings(load_s=self.load_s)
        self.messages.append({"role": "user", "content": text})
        stream = self.backend.stream(self.conversation(), SamplingParams(**self.params), timings)
        stopped = False

        def on_sigint(signum: int, frame: Any) -> None:
            nonlocal stopped
            if stopped or self.backend.interrupt_raises:  # a second Ctrl-C, or a blocking read to break
                raise KeyboardInterrupt
            stopped = True  # the engine is stopped between steps, never inside one

        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, on_sigint) if main else None
        reply: list[str] = []
        try:
            for delta in stream:
                if stopped:
                    break
                if delta:
                    reply.append(delta)
                    self.out.write(delta)
                    self.out.flush()
        except KeyboardInterrupt:
            stopped = True
        except BaseException:
            self.messages.pop()
            if reply:
                self.out.write("\n")
            raise
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
            stream.close()  # cancels the request: aborts it in the engine / closes the HTTP stream
        self.out.write("\n")
        self.out.flush()
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        self.load_s = 0.0
        timings.total_s = timings.load_s + time.perf_counter() - timings.started
        if not stopped and timings.finish_reason == "length" and self.params.get("max_tokens") is None:
            limit = f" ({self.backend.max_model_len:,} tokens)" if self.backend.max_model_len else ""
            print(f"note: the answer stopped at the end of the context window{limit}: /clear the conversation, or "
                  "start with a larger -c/--max-model-len", file=self.err, flush=True)
        if self.verbose:
            print(timings.report(), file=self.err, flush=True)
        return not stopped

    # -- the interactive loop ------------------------------------------------------------------------------
    def loop(self) -> int:
        """Read messages and commands until /bye or Ctrl-D; exit status 0."""
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        while True:
            try:
                text = read_message()
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write(f"\n{EXIT_HINT}\n")
                continue
            if not text.strip():
                continue
            if text.startswith("/"):
                if self.command(text.strip()):
                    return 0
                continue
            try:
                self.ask(text)
            except ContextLengthError as e:
                print(f"error: {context_message(e, self.backend.max_model_len, interactive=True)}", file=self.err)
            except HearthError as e:  # a bad parameter, the server went away: say so and keep the session
                print(f"error: {e}", file=self.err)

    def command(self, line: str) -> bool:
        """Run a slash command; True to end the session."""
        words = line.split()
        cmd, rest = words[0], words[1:]
        if cmd in ("/bye", "/exit"):
            return True
        if cmd in ("/?", "/help"):
            self.say(SET_HELP if rest[:1] == ["set"] else SHOW_HELP if rest[:1] == ["show"] else HELP)
        elif cmd == "/clear":
            self.messages.clear()
            self.say("Cleared session context")
        elif cmd == "/set":
            self.set(line, rest)
        elif cmd == "/show":
            self.show(rest[0] if rest else "")
        else:
            self.say(f"Unknown command '{cmd}'. Type /? for help")
        return False

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def set(self, line: str, rest: list[str]) -> None:
        what = rest[0] if rest else ""
        if what == "parameter" and len(rest) >= 2:
            try:
                fld, value = parse_parameter(rest[1], rest[2:], self.params)
            except InvalidRequestError as e:
                print(f"error: {e}", file=self.err, flush=True)
                return
            self.params[fld] = value
            self.say(f"Set parameter '{rest[1]}' to '{' '.join(rest[2:])}'")
        elif what == "parameter":
            usage = {n: f"{n} " + ("<string> <string> ..." if k is list else f"<{k.__name__}>")
                     for n, (_, k, _) in PARAMETERS.items()}
            self.say("Available Parameters:\n" + "\n".join(
                f"  /set parameter {usage[n]:<28}{h}" for n, (_, _, h) in PARAMETERS.items()))
        elif what == "system" and len(rest) >= 2:
            # the text after "/set system", quotes (Ollama allows """...""") stripped
            self.system = line.split(None, 2)[2].strip().strip('"').strip() or None
            self.say("Set system message.")
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            self.say(f"Set '{what}' mode.")
        else:
            self.say(SET_HELP)

    def show(self, what: str) -> None:
        if what == "parameters":
            shown = {n: self.params.get(f) for n, (f, _, _) in PARAMETERS.items()}
            shown["num_predict"] = -1 if shown["num_predict"] is None else shown["num_predict"]
            rows = [(n, " ".join(v) if isinstance(v, list) else v) for n, v in shown.items()
                    if v is not None and v != []]
            if self.backend.max_model_len:
                rows.append(("num_ctx", self.backend.max_model_len))
            self.say("Parameters:\n" + "\n".join(f"  {n:<20}{v}" for n, v in rows))
        elif what == "system":
            self.say(self.system or "No system message was specified for this model.")
        elif what in ("info", "template", "license"):
            try:
                from ..store import show_model

                info = show_model(self.model, allow_local_paths=True)
            except (HearthError, OSError) as e:
                print(f"error: cannot read the model's metadata: {e}", file=self.err, flush=True)
                return
            if what == "template":
                self.say(info.get("chat_template") or "No prompt template was found for this model.")
            elif what == "license":
                self.say(info.get("license") or "No license was specified for this model.")
            else:
                rows = [("architecture", info.get("architecture")), ("parameters", info.get("parameter_size")),
                        ("context length", info.get("context_length")),
                        ("embedding length", info.get("embedding_length")),
                        ("quantization", info.get("quantization")), ("path", info.get("path"))]
                if self.backend.max_model_len:
                    rows.insert(3, ("context window", f"{self.backend.max_model_len} (--max-model-len)"))
                self.say("  Model\n" + "\n".join(f"    {k:<20}{v}" for k, v in rows if v is not None))
        else:
            self.say(SHOW_HELP)


def read_message() -> str:
    """One message from the terminal: a line, or the lines between triple quotes (Ollama's multi-line input).
    EOFError on Ctrl-D; KeyboardInterrupt on Ctrl-C (a multi-line message being typed is dropped)."""
    line = input(">>> ")
    if not line.lstrip().startswith(MULTILINE):
        return line
    body = line.lstrip()[len(MULTILINE):]
    lines = []
    while True:
        if body.rstrip().endswith(MULTILINE):
            lines.append(body.rstrip()[:-len(MULTILINE)])
            return "\n".join(lines).strip("\n")
        lines.append(body)
        body = input("... ")


def context_message(e: ContextLengthError, max_model_len: int | None, interactive: bool) -> str:
    """ContextLengthError in the terms of this command: its token counts and its flags."""
    limit = max_model_len or e.max_model_len
    at_least = "at least " if e.max_tokens == 0 else ""  # counted from characters, before tokenizing
    what = "the conversation" if interactive else "the prompt"
    asked = f" with num_predict {e.max_tokens:,}" if e.max_tokens > 1 else ""
    fixes = [f"start with a larger context (-c/--max-model-len N, now {limit:,})"]
    if interactive:
        fixes.append("/clear the conversation")
    fixes.append("shorten the message" if interactive else "shorten the prompt")
    if e.max_tokens > 1:
        fixes.append("lower num_predict (--max-tokens)")
    return (f"{what} is {at_least}{e.prompt_tokens:,} tokens{asked} but the context window is "
            f"{e.max_model_len:,} tokens: " + ", ".join(fixes[:-1]) + f" or {fixes[-1]}")
