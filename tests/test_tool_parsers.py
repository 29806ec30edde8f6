"""Tool-call parsers, tool specs, tool_choice and response_format mapping (serve/tools.py): pure string tests."""
from __future__ import annotations

import json

import pytest

from hearthlm.errors import InvalidRequestError
from hearthlm.serve.tools import (GenericParser, HermesParser, Llama3Parser, MistralParser, ToolChoice, ToolSetup,
                                  ToolStream, forced_schema, ollama_format, parse_forced, parse_tool_choice,
                                  parse_tools, parser_for, response_format, tool_messages)

NAMES = {"get_weather", "add"}
W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def calls(parsed):
    content, cs = parsed
    return content, [(c.name, c.arguments) for c in cs]


def test_hermes():
    p = HermesParser(NAMES)
    assert calls(p.parse(f"Let me check.\n<tool_call>\n{W}\n</tool_call>")) == \
        ("Let me check.\n", [("get_weather", {"city": "Paris"})])
    two = f'<tool_call>{W}</tool_call>\n<tool_call>{{"name": "add", "arguments": "{{\\"a\\": 1}}"}}</tool_call>'
    assert calls(p.parse(two)) == (None, [("get_weather", {"city": "Paris"}), ("add", {"a": 1})])
    assert calls(p.parse(f"<tool_call>{W}")) == (None, [("get_weather", {"city": "Paris"})])  # cut before the tag
    for bad in ("<tool_call>{not json}</tool_call>", "<tool_call>", '<tool_call>{"name": "nope"}</tool_call>',
                "<tool_call>[1, 2]</tool_call>", "plain answer"):
        assert p.parse(bad) == (bad, [])


def test_llama3():
    p = Llama3Parser(NAMES)
    assert calls(p.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}')) == \
        (None, [("get_weather", {"city": "Oslo"})])
    assert calls(p.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1}}; '
                         '{"name": "add", "parameters": {"a": 2}}<|eom_id|>')) == \
        (None, [("add", {"a": 1}), ("add", {"a": 2})])
    for bad in ('{"name": "get_weather", "parameters": {"city": ', '<|python_tag|>brave_search.call(query="x")',
                '{"answer": 42}', 'The JSON is {"name": "add", "parameters": {}}'):
        assert p.parse(bad) == (bad, [])


def test_mistral():
    p = MistralParser(NAMES)
    assert calls(p.parse('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}, '
                         '{"name": "get_weather", "arguments": {"city": "Rome"}}]')) == \
        (None, [("add", {"a": 1}), ("get_weather", {"city": "Rome"})])
    assert calls(p.parse('Sure.[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]add[ARGS]{"a": 2}')) == \
        ("Sure.", [("add", {"a": 1}), ("add", {"a": 2})])
    for bad in ("[TOOL_CALLS] [{broken", "[TOOL_CALLS]add[ARGS]{", "[TOOL_CALLS]", "no calls"):
        assert p.parse(bad) == (bad, [])


def test_generic():
    p = GenericParser(NAMES)
    assert calls(p.parse(W)) == (None, [("get_weather", {"city": "Paris"})])
    assert calls(p.parse(f"```json\n[{W}]\n```")) == (None, [("get_weather", {"city": "Paris"})])
    assert calls(p.parse(f"ok <tool_call>{W}</tool_call>")) == ("ok ", [("get_weather", {"city": "Paris"})])
    for bad in ('{"name": "unknown_tool", "arguments": {}}', '{"city": "Paris"}', "[]", "{", "", "Hello!"):
        assert p.parse(bad) == (bad, [])


def test_parser_choice():
    assert type(parser_for("{% if tools %}<tool_call>{% endif %}", NAMES)) is HermesParser
    assert type(parser_for("{% for t in tools %}[TOOL_CALLS]{% endfor %}", NAMES)) is MistralParser
    assert type(parser_for("{% if tools %}<|python_tag|>{% endif %}", NAMES)) is Llama3Parser
    assert type(parser_for("{% if tools %}{{ tools }}{% endif %}", NAMES, "qwen2")) is HermesParser
    assert type(parser_for("{{ messages }}", NAMES, "mistral")) is GenericParser  # template ignores tools


@pytest.mark.parametrize("parser", [HermesParser(NAMES), GenericParser(NAMES), MistralParser(NAMES),
                                    Llama3Parser(NAMES)])
def test_stream_holds_back_only_possible_calls(parser):
    marker = parser.markers[0]
    call = {"<tool_call>": f"<tool_call>{W}</tool_call>", "[TOOL_CALLS]": f"[TOOL_CALLS][{W}]",
            "<|python_tag|>": f"<|python_tag|>{W}"}[marker]
    text = "Checking " + call
    for step in (1, 3, 7):
        s = ToolStream(parser)
        sent = "".join(s.feed(text[i:i + step]) for i in range(0, len(text), step))
        rest, cs = s.finish()
        assert sent == "Checking " and rest == "" and [c.name for c in cs] == ["get_weather"]
        plain = "a < b and [x] is {fine}"
        s = ToolStream(parser)
        sent = "".join(s.feed(plain[i:i + step]) for i in range(0, len(plain), step))
        rest, cs = s.finish()
        assert sent + rest == plain and not cs
    s = ToolStream(parser)  # a broken call comes out as content
    assert s.feed("x " + marker + "{oops") == "x " and s.finish() == (marker + "{oops", [])


def test_stream_json_start():
    s = ToolStream(GenericParser(NAMES))
    assert s.feed("  ") == "" and s.feed(W[:10]) == "" and s.feed(W[10:]) == ""
    assert [c.arguments for c in s.finish()[1]] == [{"city": "Paris"}]
    s = ToolStream(GenericParser(NAMES))
    assert s.feed('{"not": "a call"}') == "" and s.finish() == ('{"not": "a call"}', [])


def test_tools_and_choice_validation():
    tools = parse_tools([{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
                         {"type": "function", "function": {"name": "get_weather"}}])
    assert [t.name for t in tools] == ["add", "get_weather"] and tools[1].parameters["type"] == "object"
    bad = [([1], "tools[0]"), ([{"type": "code"}], "tools[0].type"), ([{"function": {"name": "a b"}}],
                                                                      "tools[0].function.name"),
           ([{"function": {"name": "f", "parameters": []}}], "tools[0].function.parameters"), ("x", "tools")]
    for spec, param in bad:
        with pytest.raises(InvalidRequestError) as e:
            parse_tools(spec)
        assert e.value.param == param
    assert parse_tool_choice(None, tools) == ToolChoice("auto")
    assert parse_tool_choice(None, []) == ToolChoice("none")
    assert parse_tool_choice({"type": "function", "function": {"name": "add"}}, tools) == ToolChoice("named", "add")
    for choice, t in (("sometimes", tools), ({"type": "function", "function": {"name": "nope"}}, tools),
                      ("required", []), ({"function": {}}, tools), (3, tools)):
        with pytest.raises(InvalidRequestError) as e:
            parse_tool_choice(choice, t)
        assert e.value.param == "tool_choice"


def test_forced_schema_and_parse():
    tools = parse_tools([{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
                         for n in ("a", "b")])
    s = forced_schema(tools, ToolChoice("required"), parallel=False)
    assert s["minItems"] == 1 and s["maxItems"] == 1 and len(s["items"]["anyOf"]) == 2
    assert "maxItems" not in forced_schema(tools, ToolChoice("required"), parallel=True)
    assert forced_schema(tools, ToolChoice("named", "b"), True) == {"type": "object"}
    got = parse_forced('[{"name": "a", "parameters": {"x": 1}}]', ToolChoice("required"))
    assert [(c.name, c.arguments) for c in got] == [("a", {"x": 1})]
    assert parse_forced('{"x": 1}', ToolChoice("named", "b"))[0].name == "b"
    assert parse_forced('[{"name": "a", "para', ToolChoice("required")) is None
    setup = ToolSetup(tools, ToolChoice("required"))
    assert setup.parse('[{"name"') == ('[{"name"', [])
    c = setup.parse('[{"name": "b", "parameters": {}}]')[1][0]
    assert c.id.startswith("call_") and json.loads(c.openai()["function"]["arguments"]) == {}


def test_response_format_and_ollama_format():
    assert response_format(None) is None and response_format({"type": "text"}) is None
    assert response_format({"type": "json_object"}).json is True
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                   "strict": True}}).json == schema
    for rf, param in (({"type": "xml"}, "response_format.type"), ("json", "response_format"),
                      ({"type": "json_schema"}, "response_format.json_schema"),
                      ({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}},
                       "response_format.json_schema.schema"),
                      ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
                       "response_format.json_schema.name")):
        with pytest.raises(InvalidRequestError) as e:
            response_format(rf)
        assert e.value.param == param
    assert ollama_format("") is None and ollama_format(None) is None and ollama_format("json").json is True
    assert ollama_format(schema).json == schema
    with pytest.raises(InvalidRequestError) as e:
        ollama_format("yaml")
    assert e.value.param == "format"


def test_fallback_prompt_for_templates_without_tools():
    tools = parse_tools([{"type": "function", "function": {"name": "add", "description": "Adds."}}])
    msgs = [{"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]},
            {"role": "tool", "content": "2", "tool_call_id": "call_1"}]
    out, kw = tool_messages(msgs, tools, "{{ messages }}")
    assert kw == {} and out[0]["role"] == "system" and '"name": "add"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    assert "tool_calls" not in out[2]
    same, kw = tool_messages(msgs, tools, "{% if tools %}{{ tools }}{% endif %}")
    assert same is msgs and kw["tools"][0]["function"]["name"] == "add"


def _stream(ts: ToolStream, text: str, step: int, limit=None) -> tuple[str, list[dict], list]:
    content, deltas = "", []
    for i in range(0, len(text), step):
        content += ts.feed(text[i:i + step])
        deltas += ts.call_deltas(limit)
    rest, final = ts.finish()
    return content + rest, deltas + ts.call_deltas(limit), final


def _merge(deltas: list[dict]) -> dict[int, dict]:
    acc: dict[int, dict] = {}
    for d in deltas:
        a = acc.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
        a["id"] = d.get("id") or a["id"]
        a["name"] += d.get("function", {}).get("name", "")
        a["arguments"] += d["function"].get("arguments", "")
    return acc


def test_forced_calls_stream_as_written():
    out = '[{"name": "get_weather", "parameters": {"city": "Pa\\"ris", "n": [1, {"x": "}"}]}}, ' \
          '{"name": "add", "parameters": {"a": 1}}]'
    for step in (1, 4, 200):
        content, deltas, final = _stream(ToolStream(None, ToolChoice("required")), out, step)
        merged = _merge(deltas)
        assert content == "" and [c.name for c in final] == ["get_weather", "add"]
        assert [merged[k]["name"] for k in (0, 1)] == ["get_weather", "add"]
        assert [json.loads(merged[k]["arguments"]) for k in (0, 1)] == [c.arguments for c in final]
        assert [merged[k]["id"] for k in (0, 1)] == [c.id for c in final]
        if step == 1:  # the arguments came in many chunks, after a header with the name
            assert sum(1 for d in deltas if d["index"] == 0) > 5 and deltas[0]["function"]["name"] == "get_weather"
    content, deltas, final = _stream(ToolStream(None, ToolChoice("named", "add")), '{"a": 1, "b": [2]}', 3)
    assert _merge(deltas)[0]["name"] == "add" and json.loads(_merge(deltas)[0]["arguments"]) == {"a": 1, "b": [2]}
    assert final[0].id == deltas[0]["id"]
    content, deltas, final = _stream(ToolStream(None, ToolChoice("required")), '[{"name": "add", "param', 2)
    assert final == [] and content == "" and _merge(deltas)[0]["name"] == "add"  # cut: the header went out
    content, deltas, final = _stream(ToolStream(None, ToolChoice("required")), '[{"na', 2)
    assert final == [] and deltas == [] and content == '[{"na'  # nothing sent as a call: content


A = '{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "}\\"x"}]}}'


@pytest.mark.parametrize("parser,text,content", [
    (HermesParser(NAMES), f"Hi <tool_call>{W}</tool_call>\n<tool_call>{A}</tool_call>", "Hi "),
    (Llama3Parser(NAMES), W.replace("arguments", "parameters") + "; " + A.replace("arguments", "parameters"), ""),
    (Llama3Parser(NAMES), "<|python_tag|>" + W.replace("arguments", "parameters") + "; " + A, ""),
    (MistralParser(NAMES), f"Sure.[TOOL_CALLS][{W}, {A}]", "Sure."),
    (GenericParser(NAMES), f"[{W}, {A}]", ""),
])
def test_parsed_calls_stream_as_written(parser, text, content):
    """Calls parsed from free text (tool_choice auto) stream as the model writes them: a header once the name is
    complete, then the arguments in chunks; ids and text agree with the final parse."""
    for step in (1, 5, 500):
        got, deltas, final = _stream(ToolStream(parser), text, step)
        merged = _merge(deltas)
        assert got == content and [c.name for c in final] == ["get_weather", "add"], (step, got, final)
        assert [merged[k]["name"] for k in (0, 1)] == ["get_weather", "add"]
        assert [json.loads(merged[k]["arguments"]) for k in (0, 1)] == [c.arguments for c in final]
        assert [merged[k]["id"] for k in (0, 1)] == [c.id for c in final]
        if step == 1:
            assert sum(1 for d in deltas if d["index"] == 0) > 3  # the arguments came in chunks
        assert len([d for d in deltas if "id" in d]) == 2  # one header each


def test_parsed_streaming_never_streams_an_undeclared_or_broken_call():
    answer = '{"name": "Bob", "arguments": {"age": 3}}'  # JSON that is no declared tool: content
    got, deltas, final = _stream(ToolStream(GenericParser(NAMES)), answer, 3)
    assert (got, deltas, final) == (answer, [], [])
    got, deltas, final = _stream(ToolStream(HermesParser(NAMES)), "x <tool_call>{\"na", 2)  # cut before a name
    assert (got, deltas, final) == ("x <tool_call>{\"na", [], [])
    got, deltas, final = _stream(ToolStream(HermesParser(NAMES)), 'x <tool_call>{"name": "add", "argu', 2)
    assert final == [] and got == "x " and _merge(deltas)[0]["name"] == "add"  # the header went out: no content
    got, deltas, final = _stream(ToolStream(HermesParser(NAMES)), f"<tool_call>{W}</tool_call>", 4, limit=1)
    assert len(final) == 1 and _merge(deltas)[0]["id"] == final[0].id


TOOL_TEMPLATE = (  # Qwen2.5's shape, shortened: tools in the system turn, calls as <tool_call> blocks
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _Engine(tok, max_model_len=10**6):
    """What LLMEngine.chat_prompt reads, over a real tokenizer (no model)."""
    from hearthlm.engine.engine import LLMEngine

    class Engine:
        chat_prompt = LLMEngine.chat_prompt

        def __init__(self):
            self.tokenizer, self.max_model_len, self.max_token_bytes = tok, max_model_len, None

        def encode(self, text, add_special_tokens=True):
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

        def refuse_unfittable(self, n, params):
            pass

    return Engine()


def test_tools_rendered_through_the_template(default_tokenizer):
    from hearthlm.loader.tokenizer import Tokenizer
    from hearthlm.sampling import SamplingParams

    base = default_tokenizer
    tok = Tokenizer(base.backend, base.special_tokens, base.extra_special_tokens, {"default": TOOL_TEMPLATE},
                    base.eos_token_ids)
    tools = parse_tools([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    history = [{"role": "user", "content": "old " * 50}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
               {"role": "tool", "content": "cold"}]
    setup = ToolSetup(tools, ToolChoice("auto"))
    ids, _, dropped = setup.prepare(_Engine(tok), history, SamplingParams(max_tokens=4))
    text = tok.decode(ids, skip_special_tokens=False)
    assert '"name": "get_weather"' in text and '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}' \
        in text and type(setup.parser) is HermesParser and dropped == 0
    short = SamplingParams(max_tokens=4, truncate="left")  # oldest turns dropped, the tools kept
    ids, _, dropped = setup.prepare(_Engine(tok, max_model_len=len(ids) - 20), history, short)
    text = tok.decode(ids, skip_special_tokens=False)
    assert dropped > 0 and "old old" not in text and "Tools:" in text and "cold" in text
    setup = ToolSetup(tools, ToolChoice("auto"))  # a template without tools: described in the system turn
    ids, _, _ = setup.prepare(_Engine(base), history[2:], SamplingParams(max_tokens=4))
    text = base.decode(ids, skip_special_tokens=False)
    assert "You can call these tools" in text and type(setup.parser) is GenericParser
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text


def test_mistral_templates_get_short_call_ids():
    msgs = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0123456789abcdef", "type": "function", "function": {"name": "add", "arguments": {}}}]},
        {"role": "tool", "content": "1", "tool_call_id": "call_0123456789abcdef"}]
    out, _ = tool_messages(msgs, [], "{% for t in tools %}[TOOL_CALLS]{% endfor %}")
    assert out[0]["tool_calls"][0]["id"] == out[1]["tool_call_id"] == "789abcdef"
    assert msgs[0]["tool_calls"][0]["id"] == "call_0123456789abcdef"  # the request's own messages untouched


def test_stream_code_fences():
    s = ToolStream(GenericParser(NAMES))
    assert s.feed("`") == "" and s.feed("x` is a name") == "`x` is a name"
    s = ToolStream(GenericParser(NAMES))
    assert s.feed("``") == "" and s.feed("`json\n" + W + "\n```") == "" and s.finish()[1][0].name == "get_weather"
