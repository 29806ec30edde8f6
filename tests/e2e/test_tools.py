"""Tool calling and structured outputs through the real openai and ollama SDKs against `hearth serve`.

The default model is tiny: schemas use enums and booleans so that grammar-shaped outputs end within max_tokens."""
from __future__ import annotations

import json
from typing import Literal

import ollama
import openai
import pytest
from pydantic import BaseModel

CITIES = ["Paris", "Oslo", "Rome"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": CITIES},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
LIGHT = {"type": "function", "function": {
    "name": "set_light", "description": "Switch the light.",
    "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"],
                   "additionalProperties": False}}}
TOOLS = [WEATHER, LIGHT]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FAST = {"model": "smollm2", "temperature": 0, "max_tokens": 40}


def valid_args(name: str, args: dict) -> bool:
    """The tool's parameter schema, checked by hand (jsonschema is not a test dependency)."""
    if name == "get_weather":
        return set(args) == {"city", "unit"} and args["city"] in CITIES and args["unit"] in ("c", "f")
    return name == "set_light" and set(args) == {"on"} and isinstance(args["on"], bool)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def streamed_calls(chunks) -> tuple[dict[int, dict], str | None, str]:
    """Tool-call deltas accumulated as SDK users do: by index, arguments concatenated (and counted)."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for ch in chunks:
        for c in ch.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                acc = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": "", "deltas": 0})
                acc["deltas"] += 1
                acc["id"] = tc.id or acc["id"]
                acc["name"] += (tc.function.name or "") if tc.function else ""
                acc["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = c.finish_reason or finish
    return calls, finish, content


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_light"}}])
def test_forced_calls_stream_and_not(client, choice):
    """tool_choice required / a named function: the grammar makes the output a valid call."""
    kw = {**FAST, "messages": ASK, "tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False}
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert valid_args(call.function.name, json.loads(call.function.arguments))
    if isinstance(choice, dict):
        assert call.function.name == "set_light"
    calls, finish, content = streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls" and content == "" and list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == call.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)
    assert calls[0]["deltas"] > 2  # the arguments streamed as they were written


def test_tool_result_round_trip(client, server):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model="smollm2", messages=history, tools=TOOLS, tool_choice="none",
                                       max_tokens=2, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    plain = server.post("/tokenize", json={"messages": ASK}).json()["count"]
    assert r.usage.prompt_tokens > plain + 30  # the tools, the call and its result are in the prompt


def test_auto_never_breaks(client):
    """tool_choice auto: whatever the model writes is content or valid calls, the same streamed and not."""
    kw = {**FAST, "messages": ASK, "tools": TOOLS, "max_tokens": 8}
    m = client.chat.completions.create(**kw).choices[0]
    calls, finish, content = streamed_calls(client.chat.completions.create(**kw, stream=True))
    if m.message.tool_calls:
        assert m.finish_reason == finish == "tool_calls"
        assert [c.function.name for c in m.message.tool_calls] == [calls[i]["name"] for i in sorted(calls)]
    else:
        assert content == m.message.content and finish == m.finish_reason and not calls


def test_bad_requests_name_the_field(server):
    def param(body: dict, path: str = "/v1/chat/completions") -> str:
        base = {"model": "smollm2", "max_tokens": 4, **({"messages": ASK} if "chat" in path else {})}
        r = server.post(path, json={**base, **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]["param"]

    assert param({"tools": [{"type": "function", "function": {"name": "bad name"}}]}) == "tools[0].function.name"
    assert param({"tools": [{"type": "retrieval"}]}) == "tools[0].type"
    assert param({"tools": {"a": 1}}) == "tools"
    assert param({"tool_choice": "required"}) == "tool_choice"
    assert param({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}) == "tool_choice"
    assert param({"tools": TOOLS, "tool_choice": "always"}) == "tool_choice"
    assert param({"tools": TOOLS, "logprobs": True, "stream": True}) == "logprobs"
    assert param({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}) \
        == "response_format"
    assert param({"response_format": {"type": "yaml"}}) == "response_format.type"
    assert param({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}}) \
        == "response_format.json_schema.schema"
    assert param({"functions": [{"name": "f"}]}) == "functions"
    assert param({"prompt": "x", "tools": TOOLS}, "/v1/completions") == "tools"
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    assert param({"response_format": bad_schema}).startswith("response_format")  # the grammar engine's 400
    assert param({"prompt": "x", "response_format": bad_schema}, "/v1/completions").startswith("response_format")


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    friendly: bool


def test_response_format_json_schema_and_parse(client):
    """parse(response_format=Model) sends a strict json_schema response_format and validates the reply."""
    parse = client.chat.completions.parse if hasattr(client.chat.completions, "parse") \
        else client.beta.chat.completions.parse
    r = parse(**FAST, messages=[{"role": "user", "content": "Describe a pet."}], response_format=Pet)
    assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Pet)
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "boolean"}}}
    r = client.completions.create(model="smollm2", prompt="Is water wet?", max_tokens=8, temperature=0,
                                  extra_body={"response_format": schema})
    assert json.loads(r.choices[0].text) in (True, False)


def test_ollama_format_and_tools(server):
    client = ollama.Client(host=server.url, timeout=120)
    opts = {"temperature": 0, "num_predict": 40}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.chat(model="smollm2", messages=[{"role": "user", "content": "Fine?"}], format=schema, options=opts)
    assert isinstance(json.loads(r.message.content)["ok"], bool) and r.done_reason == "stop"
    # a call-shaped output (forced here through format) comes back as message.tool_calls, arguments an object
    call_schema = {"type": "object", "properties": {"name": {"enum": ["set_light"]},
                                                    "arguments": LIGHT["function"]["parameters"]},
                   "required": ["name", "arguments"], "additionalProperties": False}
    parts = list(client.chat(model="smollm2", messages=ASK, tools=TOOLS, format=call_schema, options=opts,
                             stream=True))
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name == "set_light", parts
    assert valid_args("set_light", dict(calls[0].function.arguments))
    assert parts[-1].done and parts[-1].done_reason == "stop"
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]},
        {"role": "tool", "content": "21 C", "tool_name": "get_weather"}]
    r = client.chat(model="smollm2", messages=history, tools=TOOLS, options={"temperature": 0, "num_predict": 2})
    assert r.done and r.prompt_eval_count > 200  # the tools, the call and its result are in the prompt
    for fmt in ("yaml", {"type": "no-such-type"}):
        r = server.post("/api/chat", json={"model": "smollm2", "messages": ASK, "format": fmt})
        assert r.status_code == 400 and r.json()["error"].startswith("format"), r.text
