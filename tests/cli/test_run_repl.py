"""`hearth run` as `ollama run`, driven through a pseudo-terminal with the real default model: Ctrl-C stops an answer
and keeps the session, slash commands, context errors, --verbose timings, one-shot prompts (long arguments, stdin)
and the unknown-model error. The model loads three times in all; every wait has a deadline."""
from __future__ import annotations

import fcntl
import os
import re
import select
import subprocess
import sys
import termios
import time

import pytest

from tests.client.fake_server import unused_port
from tests.conftest import needs_default_model

HEARTH = [sys.executable, "-m", "hearthlm.cli.main"]
FAST = ["-t", "1"]  # one thread: a shared 2-core machine slows OpenMP's 2 threads ~10x
WORDS_600 = " ".join(["word"] * 600)


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, HEARTH_HOME=str(tmp_path), HEARTH_HOST=f"127.0.0.1:{unused_port()}", TERM="dumb",
                PYTHONUNBUFFERED="1")


def _take_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty becomes the controlling terminal: ^C sends SIGINT


class Pty:
    """A child on a pseudo-terminal that is its controlling terminal (so ^C and ^D behave as at a keyboard)."""

    def __init__(self, argv: list[str], env: dict, deadline: float):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                     start_new_session=True, preexec_fn=_take_terminal)
        os.close(slave)
        self.out, self.pos, self.deadline = "", 0, deadline

    def expect(self, needle: str | re.Pattern, timeout: float | None = None) -> str:
        """Output from the last match up to and including `needle` (a string or regex); fails at the deadline."""
        end = min(self.deadline, time.monotonic() + timeout) if timeout else self.deadline
        while True:
            m = re.compile(re.escape(needle) if isinstance(needle, str) else needle).search(self.out, self.pos)
            if m:
                seen, self.pos = self.out[self.pos:m.end()], m.end()
                return seen
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} did not appear in time; after position {self.pos}: "
                                     f"{self.out[self.pos:]!r}")
            if select.select([self.master], [], [], min(left, 0.05))[0]:
                try:
                    self.out += os.read(self.master, 65536).decode(errors="replace").replace("\r\n", "\n")
                except OSError:  # the child exited and closed the terminal
                    raise AssertionError(f"{needle!r} never appeared; output: {self.out[self.pos:]!r}") from None

    def drain(self, timeout: float = 2) -> str:
        """Everything the child wrote until it closed the terminal (or `timeout`)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and select.select([self.master], [], [], 0.05)[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                break
            if not data:
                break
            self.out += data.decode(errors="replace").replace("\r\n", "\n")
        return self.out

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def line(self, text: str) -> None:
        self.send(text + "\n")
        self.expect(text.splitlines()[-1][-40:])  # the terminal's echo

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        os.close(self.master)


def _eval_count(text: str) -> int:
    return int(re.findall(r"\beval count:\s+(\d+) token", text)[-1])


@needs_default_model
def test_interactive_session(env):
    deadline = time.monotonic() + 90
    pty = Pty([*HEARTH, "run", "smollm2", *FAST, "-c", "512", "--temperature", "0", "--device", "cpu", "--verbose"],
              env, deadline)
    try:
        pty.expect(">>> ")
        pty.line("/?")
        assert "/set" in pty.expect(">>> ") and "/bye" in pty.out[-400:]
        pty.line("/foo")
        assert "Unknown command '/foo'. Type /? for help" in pty.expect(">>> ")
        pty.line("/set parameter temperature abc")
        assert "error: temperature must be a number, got 'abc'" in pty.expect(">>> ")
        pty.line("/set parameter temperature -1")
        assert "error: temperature must be in [0" in pty.expect(">>> ")
        pty.line("/set parameter repeat_penalty 0")
        assert "error: repeat_penalty must be > 0" in pty.expect(">>> ")
        pty.line("/set parameter temperature 0")
        assert "Set parameter 'temperature' to '0'" in pty.expect(">>> ")
        pty.line("/set parameter seed 7")
        pty.expect(">>> ")
        pty.line("/show parameters")
        shown = pty.expect(">>> ")
        assert re.search(r"temperature\s+0\.0", shown) and re.search(r"seed\s+7", shown), shown
        assert re.search(r"num_ctx\s+512", shown), shown

        # Ctrl-C mid-answer: the answer stops (a newline, the prompt again) long before its natural end, which is
        # the context's end (greedy, this prompt runs on: ~450 tokens)
        pty.line("Write a long story about a dragon.")
        pty.expect(re.compile(r"\w+\W+\w+\W+\w+"), timeout=30)  # a few words streamed
        time.sleep(0.2)
        pty.send("\x03")
        stopped_at = time.monotonic()
        seen = pty.expect(">>> ", timeout=10)
        assert time.monotonic() - stopped_at < 5
        assert "\n" in seen and "eval count:" in seen, seen
        assert _eval_count(seen) < 300, seen
        assert pty.proc.poll() is None

        # the same session answers the next question (typed over several lines between triple quotes)
        pty.line('"""What is the capital')
        pty.expect("... ")
        pty.line('of France?"""')
        answer = pty.expect(">>> ", timeout=30)
        assert "Paris" in answer, answer
        for label in ("total duration:", "load duration:", "prompt eval count:", "prompt eval duration:",
                      "prompt eval rate:", "eval duration:", "eval rate:"):
            assert label in answer, answer
        assert re.search(r"eval rate:\s+[\d.]+ tokens/s", answer), answer

        # a message over the context window: an error naming the numbers and the fixes; the session goes on
        pty.send(WORDS_600 + "\n")
        err = pty.expect(">>> ", timeout=30)
        assert re.search(r"error: the conversation is (at least )?[\d,]+ tokens but the context window is 512 "
                         r"tokens: .*-c/--max-model-len.*/clear", err), err

        pty.line("/set system You are a pirate.")
        assert "Set system message." in pty.expect(">>> ")
        pty.line("/show system")
        assert "You are a pirate." in pty.expect(">>> ")
        pty.line("/show info")
        info = pty.expect(">>> ")
        assert re.search(r"architecture\s+llama", info) and re.search(r"quantization\s+Q4_1", info), info
        pty.line("/clear")
        assert "Cleared session context" in pty.expect(">>> ")

        pty.send("\x03")  # Ctrl-C at an empty prompt: a hint, not an exit
        assert "Use Ctrl + d or /bye to exit." in pty.expect(">>> ", timeout=10)
        assert pty.proc.poll() is None
        pty.line("/bye")
        assert pty.proc.wait(max(1.0, deadline - time.monotonic())) == 0
    finally:
        pty.close()


def _run(args: list[str], env: dict, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*HEARTH, "run", *args], env=env, input=stdin, stdin=None if stdin else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_model_is_an_error_not_a_prompt(env):
    out = _run(["no-such-model", "hello"], env)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: model not found: no-such-model\n"), out.stderr
    assert "hearth pull no-such-model" in out.stderr and "hearth list" in out.stderr


def test_a_long_prompt_in_the_model_place_is_not_a_file_name(env, monkeypatch, capsys):
    from hearthlm.cli.main import main

    monkeypatch.setenv("HEARTH_HOME", env["HEARTH_HOME"])
    long_prompt = "Why is the sky blue? " * 20  # over 255 bytes: stat() would fail with "File name too long"
    assert main(["run", long_prompt]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model not found: Why is the sky blue?"), err
    assert "hearth run smollm2" in err


@needs_default_model
def test_one_shot_long_argument_with_verbose_timings(env):
    prompt = "Answer in one short sentence. " + "Why is the sky blue? " * 15  # ~345 bytes
    out = _run(["smollm2", prompt, *FAST, "--max-tokens", "8", "--temperature", "0", "--verbose"], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and out.stdout.endswith("\n")
    assert int(re.search(r"prompt eval count:\s+(\d+)", out.stderr).group(1)) > 80, out.stderr  # the whole prompt
    assert 1 <= _eval_count(out.stderr) <= 8, out.stderr
    assert "eval rate:" in out.stderr and "eval rate:" not in out.stdout


@needs_default_model
def test_one_shot_from_stdin_over_the_context(env):
    out = _run(["smollm2", *FAST, "-c", "64"], env, stdin=" ".join(["word"] * 300))
    assert out.returncode == 1 and out.stdout == ""
    assert re.match(r"error: the prompt is (at least )?[\d,]+ tokens but the context window is 64 tokens: "
                    r".*-c/--max-model-len", out.stderr), out.stderr
    assert int(re.search(r"is (?:at least )?([\d,]+) tokens", out.stderr).group(1).replace(",", "")) > 64


def test_words_after_double_dash_are_the_prompt():
    from hearthlm.cli.main import build_parser

    args = build_parser().parse_args(["run", "smollm2", "-t", "1", "--", "-c", "64", "--help"])
    assert args.model == "smollm2" and args.prompt == [] and args.threads == 1
    assert args.after_dashes == ["-c", "64", "--help"] and args.max_model_len == 4096
    args = build_parser().parse_args(["run", "--", "hello"])  # no model: the default one
    assert args.model is None and args.after_dashes == ["hello"]


@needs_default_model
def test_an_empty_piped_prompt_is_an_error_before_loading(monkeypatch, capsys):
    import io

    from hearthlm.cli import run_cmd
    from hearthlm.cli.main import main

    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    monkeypatch.setattr(run_cmd, "LocalBackend", None)  # loading would fail the test
    assert main(["run", "smollm2"]) == 1
    assert "error: the prompt is empty" in capsys.readouterr().err
