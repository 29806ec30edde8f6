"""The `hearth run` session without a model: parameters, conversation bookkeeping, notes and messages."""
from __future__ import annotations

import io

import pytest

from hearthlm.cli.repl import Session, Timings, context_message, parse_parameter, read_message
from hearthlm.errors import ContextLengthError, InvalidRequestError, UnavailableError

BASE = dict(temperature=0.7, top_p=0.9, max_tokens=None)


class Stub:
    interrupt_raises = False
    max_model_len = 64
    url = None

    def __init__(self, deltas: list[str], finish: str | None = "stop", fail: Exception | None = None):
        self.deltas, self.finish, self.fail, self.seen = deltas, finish, fail, []

    def stream(self, messages, params, timings: Timings):
        self.seen.append((list(messages), params))
        if self.fail:
            raise self.fail
        yield from self.deltas
        timings.finish_reason = self.finish


def session(backend: Stub, **kw) -> tuple[Session, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Session(backend, "smollm2", dict(BASE), out=out, err=err, **kw), out, err


def test_parameters_use_ollama_names_and_the_api_validation():
    assert parse_parameter("temperature", ["0"], BASE) == ("temperature", 0.0)
    assert parse_parameter("num_predict", ["-1"], BASE) == ("max_tokens", None)
    assert parse_parameter("max_tokens", ["12"], BASE) == ("max_tokens", 12)
    assert parse_parameter("repeat_penalty", ["1.1"], BASE) == ("repetition_penalty", 1.1)
    assert parse_parameter("stop", ["</s>", "END"], BASE) == ("stop", ["</s>", "END"])
    for name, value, message in [("temperature", "hot", "temperature must be a number, got 'hot'"),
                                 ("top_p", "0", "top_p must be in (0, 1]"),
                                 ("repeat_penalty", "0", "repeat_penalty must be > 0"),
                                 ("num_predict", "0", "num_predict must be a positive integer"),
                                 ("seed", "1.5", "seed must be an integer"),
                                 ("num_ctx", "8192", "restart with `hearth run MODEL -c N`"),
                                 ("warmth", "1", "unknown parameter 'warmth'")]:
        with pytest.raises(InvalidRequestError) as e:
            parse_parameter(name, [value], BASE)
        assert message in str(e.value), str(e.value)


def test_the_conversation_keeps_answers_and_drops_refused_turns():
    backend = Stub(["Hel", "lo", ""])
    s, out, err = session(backend, system="be brief")
    assert s.ask("hi") and out.getvalue() == "Hello\n"
    assert s.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]
    assert backend.seen[0][0][0] == {"role": "system", "content": "be brief"}
    backend.fail = UnavailableError("the server went away")
    with pytest.raises(UnavailableError):
        s.ask("again")
    assert len(s.messages) == 2  # the refused question is not part of the conversation
    s.command("/clear")
    assert s.messages == [] and s.system == "be brief"


def test_a_note_when_the_answer_fills_the_context_and_timings_when_verbose():
    s, out, err = session(Stub(["a", "b"], finish="length"), verbose=True)
    s.ask("hi")
    assert "note: the answer stopped at the end of the context window (64 tokens)" in err.getvalue()
    assert "eval count:" in err.getvalue() and "eval count:" not in out.getvalue()
    s, out, err = session(Stub(["a"], finish="stop"))
    s.ask("hi")
    assert err.getvalue() == ""


def test_commands():
    s, out, err = session(Stub([]))
    assert s.command("/bye") and s.command("/exit")
    for line, expected in [("/foo", "Unknown command '/foo'. Type /? for help"), ("/?", "/set"),
                           ("/help show", "/show template"), ("/set parameter", "/set parameter temperature"),
                           ("/set system Talk like a pirate.", "Set system message."),
                           ("/show system", "Talk like a pirate."), ("/set parameter top_k 40", "'top_k' to '40'"),
                           ("/show parameters", "top_k")]:
        assert not s.command(line)
        assert expected in out.getvalue(), (line, out.getvalue())
    assert s.params["top_k"] == 40 and s.system == "Talk like a pirate."
    s.command("/set parameter top_k x")
    assert "error: top_k must be an integer, got 'x'" in err.getvalue() and s.params["top_k"] == 40


def test_context_message_names_the_numbers_and_fixes():
    text = context_message(ContextLengthError(900, 1, 512), 512, interactive=True)
    assert text.startswith("the conversation is 900 tokens but the context window is 512 tokens: ")
    assert "-c/--max-model-len" in text and "/clear" in text
    text = context_message(ContextLengthError(100, 600, 512), 512, interactive=False)
    assert "with num_predict 600" in text and "lower num_predict" in text and "/clear" not in text


def test_multiline_input(monkeypatch):
    lines = iter(['"""first line', "second", 'third"""'])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert read_message() == "first line\nsecond\nthird"
    monkeypatch.setattr("builtins.input", lambda prompt="": '"""one line"""')
    assert read_message() == "one line"
