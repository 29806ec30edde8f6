"""The official openai SDK against `hearth serve`."""
from __future__ import annotations

import openai
import pytest

from .conftest import chat_ids

PROMPT = "The capital of France is"
MSGS = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "smollm2"


def test_completion_usage_matches_tokenizer(client, tokenizer):
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "smollm2"
    assert r.choices[0].text.startswith(" Paris")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 3  # really streamed
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices


def test_chat_usage_and_stream(client, tokenizer):
    r = client.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(chat_ids(tokenizer, MSGS))
    assert 0 < r.usage.completion_tokens <= 20
    stream = client.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_tokenize_endpoint_matches(server, tokenizer):
    body = server.post("/tokenize", json={"messages": MSGS}).json()
    assert body["tokens"] == chat_ids(tokenizer, MSGS) and body["max_model_len"] == 2048
    assert server.post("/tokenize", json={"prompt": PROMPT}).json()["count"] == len(tokenizer.encode(PROMPT))


def test_n2_and_seed_reproducible(client):
    kw = {"model": "smollm2", "messages": MSGS, "max_tokens": 8, "temperature": 1.0, "seed": 1234, "n": 2}
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    c = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=2)
    d = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=2)
    assert [x.text for x in c.choices] == [x.text for x in d.choices]
    assert 0 < c.usage.completion_tokens <= 16
    streamed = {}
    for ch in client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7,
                                        n=2, stream=True):
        for choice in ch.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[0], streamed[1]] == [x.text for x in c.choices]


def test_stop_sequences(client):
    full = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    assert "answer" in full
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0, stop=["answer"])
    assert r.choices[0].text == full[:full.index("answer")]
    assert r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0, stop="answer",
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_logprobs(client):
    r = client.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy picks the top token
        assert item.logprob <= 0
    assert "".join(i.token for i in content) == r.choices[0].message.content
    c = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == c.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)


def test_sampling_extras_and_penalties(client):
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0.8, top_p=0.9,
                                  presence_penalty=0.5, frequency_penalty=0.5, seed=3,
                                  extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                              "ignore_eos": True})
    assert r.usage.completion_tokens == 12


def test_max_completion_tokens_and_left_truncation(client, server):
    r = client.chat.completions.create(model="smollm2", messages=MSGS, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    long = [{"role": "system", "content": "Answer briefly."}] + \
        [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 300} for i in range(9)]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=long, max_tokens=8)
    assert "max_model_len is 2,048" in e.value.body["message"]
    r = client.chat.completions.with_raw_response.create(model="smollm2", messages=long, max_tokens=8,
                                                         temperature=0, extra_body={"truncate": "left"})
    parsed = r.parse()
    assert parsed.usage.prompt_tokens + 8 <= 2048
    truncated = int(r.headers["x-truncated-tokens"])
    assert truncated > 0 and parsed.usage.model_extra["truncated_tokens"] == truncated


def test_logit_bias_forces_and_bans_tokens(client, tokenizer):
    blue = tokenizer.encode(" blue")[0]
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, temperature=0,
                                  logit_bias={str(blue): 100})
    assert r.choices[0].text == tokenizer.decode([blue] * 3)
    paris = tokenizer.encode(" Paris")[0]
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=2, temperature=0,
                                  logit_bias={str(paris): -100})
    assert not r.choices[0].text.startswith(" Paris")
    chat = client.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=2, temperature=0,
                                          logit_bias={str(blue): 100})
    assert chat.choices[0].message.content == tokenizer.decode([blue] * 2)
