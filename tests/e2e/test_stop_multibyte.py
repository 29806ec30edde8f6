"""Stop strings ending in a character whose UTF-8 bytes span several tokens, through the OpenAI and Ollama
streaming endpoints with the real SDKs: the stop fires, the streamed text ends exactly before it (or with it,
include_stop_str_in_output) and no delta holds a partial character."""
from __future__ import annotations

import ollama
import openai
import pytest

from tests.test_stop_multibyte import CHATS, CJK, FFFD, split_stops

MODEL = "smollm2"
MAX_TOKENS = 6
E2E_CHATS = CHATS + [[{"role": "user", "content": "Repeat exactly: Příliš žluťoučký kůň úpěl ďábelské ódy."}]]


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oll(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


@pytest.fixture(scope="module")
def cases(oai) -> list[tuple[list[dict], str, str]]:
    """(conversation, stop, text before it), found from each token's own bytes in the greedy chat logprobs."""
    found = []
    for conv in E2E_CHATS:
        r = oai.chat.completions.create(model=MODEL, messages=conv, max_tokens=MAX_TOKENS, temperature=0,
                                        logprobs=True)
        choice = r.choices[0]
        pieces = [bytes(e.bytes) for e in choice.logprobs.content]
        found += [(conv, stop, before) for stop, before in split_stops(pieces, choice.message.content)]
    assert all(any(c is conv for c, _, _ in found) for conv in E2E_CHATS), found  # emoji and accented letters
    return found


def test_openai_completions_cjk_example(oai):
    for include in (False, True):
        chunks = list(oai.completions.create(model=MODEL, prompt=CJK, max_tokens=12, temperature=0, stop="界",
                                             stream=True, extra_body={"include_stop_str_in_output": include}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == ("世界" if include else "世")
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_openai_chat_stream(oai, cases):
    for n, (conv, stop, expected) in enumerate(cases):
        include = n == 0
        deltas, finish = [], []
        for chunk in oai.chat.completions.create(model=MODEL, messages=conv, max_tokens=MAX_TOKENS, temperature=0,
                                                 stop=[stop], stream=True,
                                                 extra_body={"include_stop_str_in_output": include}):
            for ch in chunk.choices:
                deltas.append(ch.delta.content or "")
                finish += [ch.finish_reason] if ch.finish_reason else []
        assert "".join(deltas) == expected + (stop if include else ""), (stop, deltas)
        assert not any(FFFD in d for d in deltas) and finish == ["stop"], (deltas, finish)


def test_ollama_stream(oll, cases):
    for conv, stop, expected in cases:
        parts = list(oll.chat(model=MODEL, messages=conv, stream=True,
                              options={"temperature": 0, "num_predict": MAX_TOKENS, "stop": [stop]}))
        deltas = [p.message.content for p in parts]
        assert "".join(deltas) == expected and not any(FFFD in d for d in deltas), (stop, deltas)
        assert parts[-1].done and parts[-1].done_reason == "stop"
    parts = list(oll.generate(model=MODEL, prompt=CJK, raw=True, stream=True,
                              options={"temperature": 0, "num_predict": 12, "stop": ["界"]}))
    assert "".join(p.response for p in parts) == "世" and parts[-1].done_reason == "stop"
