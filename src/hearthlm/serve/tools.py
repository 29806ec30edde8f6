"""Structured-output request fields and tool calling, shared by the OpenAI and Ollama dialects.

- `response_format` (OpenAI) and `format` (Ollama) -> a StructuredOutput (the grammar engine enforces it).
- Tools: validated specs, rendered through the model's own chat template (HF templates take `tools=`; a template
  that ignores tools gets them described in the system message instead), and calls parsed back from the output by
  a per-family parser chosen from the template text: Hermes/Qwen `<tool_call>`, Llama 3.x JSON / `<|python_tag|>`,
  Mistral `[TOOL_CALLS]`, or a generic JSON one. Output that does not parse as calls is plain content, never an
  error.
- `tool_choice` "required" / a named function is enforced by the grammar engine: the output is a JSON array of
  {"name", "parameters"} objects (anyOf over the tools), or the named function's arguments object.
- Streaming: `ToolStream` emits content as it comes but holds back text that may start a call until it is known
  not to be one. A forced call streams as it is written (its name, then its arguments in chunks); calls parsed
  from free text are emitted whole once the output is complete (a later malformed block makes it all content)."""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequestError
from ..sampling import StructuredOutput

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's function-name rule (dots too, as vLLM allows)


def _kind(v: object) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:60] + '...'}"


# ---------------- response_format / format ----------------
def response_format(rf: object, param: str = "response_format") -> StructuredOutput | None:
    """OpenAI response_format -> StructuredOutput: text = none, json_object = any JSON object, json_schema = the
    schema. Anything malformed is a 400 naming the field."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise InvalidRequestError(f"{param} must be an object like {{\"type\": \"json_object\"}}, got {_kind(rf)}",
                                  param=param)
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError(f"{param}.json_schema must be an object with name and schema, got "
                                      f"{_kind(spec)}", param=f"{param}.json_schema")
        name = spec.get("name")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise InvalidRequestError(f"{param}.json_schema.name must be 1 to 64 letters, digits, '_' or '-', got "
                                      f"{_kind(name)}", param=f"{param}.json_schema.name")
        if spec.get("strict") not in (None, True, False):
            raise InvalidRequestError(f"{param}.json_schema.strict must be true or false",
                                      param=f"{param}.json_schema.strict")
        schema = spec.get("schema")
        if schema is None:  # OpenAI allows it to be left out: any JSON object
            return StructuredOutput(json=True)
        if not isinstance(schema, dict):
            raise InvalidRequestError(f"{param}.json_schema.schema must be a JSON schema object, got "
                                      f"{_kind(schema)}", param=f"{param}.json_schema.schema")
        return _structured(lambda: StructuredOutput(json=schema), f"{param}.json_schema.schema")
    raise InvalidRequestError(f"{param}.type must be 'text', 'json_object' or 'json_schema', got {_kind(kind)}",
                              param=f"{param}.type")


def ollama_format(fmt: object) -> StructuredOutput | None:
    """Ollama format: "json" = any JSON object, an object = a JSON schema, ""/null = free text."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return StructuredOutput(json=True)
    if isinstance(fmt, dict):
        return _structured(lambda: StructuredOutput(json=fmt), "format")
    raise InvalidRequestError(f"format must be \"json\" or a JSON schema object, got {_kind(fmt)}", param="format")


def _structured(make, param: str) -> StructuredOutput:
    try:
        return make()
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{param}: {e}", param=param) from None


# ---------------- tool specs and tool_choice ----------------
@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]
    spec: dict[str, Any]  # as the chat template gets it: {"type": "function", "function": {...}}


def parse_tools(tools: object, param: str = "tools") -> list[Tool]:
    """Validated function tools ({"type": "function", "function": {"name", "description", "parameters"}});
    a bad one is a 400 naming tools[i]..."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidRequestError(f"{param} must be a list of function tools, got {_kind(tools)}", param=param)
    out: list[Tool] = []
    seen: set[str] = set()
    for i, t in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(t, dict):
            raise InvalidRequestError(f"{where} must be an object {{\"type\": \"function\", \"function\": {{...}}}}, "
                                      f"got {_kind(t)}", param=where)
        if t.get("type", "function") != "function":
            raise InvalidRequestError(f"{where}.type must be 'function' (the only tool type served), got "
                                      f"{_kind(t.get('type'))}", param=f"{where}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"{where}.function must be an object with a name", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(f"{where}.function.name must be 1 to 64 letters, digits, '_', '.' or '-', "
                                      f"got {_kind(name)}", param=f"{where}.function.name")
        if name in seen:
            raise InvalidRequestError(f"{where}.function.name {name!r} is given twice", param=f"{where}.function.name")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise InvalidRequestError(f"{where}.function.description must be a string",
                                      param=f"{where}.function.description")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise InvalidRequestError(f"{where}.function.parameters must be a JSON schema object, got "
                                      f"{_kind(params)}", param=f"{where}.function.parameters")
        clean_fn = {k: v for k, v in fn.items() if v is not None}
        clean_fn["parameters"] = params
        out.append(Tool(name, params, {"type": "function", "function": clean_fn}))
    return out


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # none | auto | required | named
    name: str | None = None


def parse_tool_choice(choice: object, tools: list[Tool], param: str = "tool_choice") -> ToolChoice:
    """OpenAI tool_choice: none | auto | required | {"type": "function", "function": {"name": ...}}; the default
    is auto with tools and none without. tool_choice other than none without tools, or naming a function not in
    tools, is a 400 naming tool_choice."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequestError(f"{param} must be 'none', 'auto', 'required' or {{\"type\": \"function\", "
                                      f"\"function\": {{\"name\": ...}}}}, got {_kind(choice)}", param=param)
        mode = choice
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise InvalidRequestError(f"{param} must name a function as {{\"type\": \"function\", \"function\": "
                                      f"{{\"name\": ...}}}}, got {_kind(choice)}", param=param)
        if tools and name not in {t.name for t in tools}:
            raise InvalidRequestError(f"{param} names function {name!r}, which is not among tools "
                                      f"({', '.join(t.name for t in tools)})", param=param)
        mode = "named"
    else:
        raise InvalidRequestError(f"{param} must be a string or an object, got {_kind(choice)}", param=param)
    if mode != "none" and not tools:
        what = "naming a function" if mode == "named" else repr(mode)
        raise InvalidRequestError(f"{param} {what} needs tools: send the functions in tools", param=param)
    return ToolChoice(mode, name if mode == "named" else None)


def forced_schema(tools: list[Tool], choice: ToolChoice, parallel: bool) -> dict[str, Any]:
    """The JSON schema that makes the output a valid call (as vLLM): tool_choice required -> an array (at least
    one item; exactly one without parallel calls) of {"name", "parameters"} objects, anyOf over the tools; a named
    function -> its arguments object."""
    if choice.mode == "named":
        return next(t.parameters for t in tools if t.name == choice.name)
    items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.name]},
                                               "parameters": t.parameters},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


# ---------------- calls ----------------
@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: _new_id())

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def openai(self, index: int | None = None) -> dict[str, Any]:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_json}}
        return d if index is None else {"index": index, **d}

    def ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": self.arguments}}


def _call(obj: object, names: set[str] | None) -> ToolCall | None:
    """{"name": ..., "arguments" | "parameters": {...} or its JSON text} -> a call; None if it is not one."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:  # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    if names is not None and name not in names:
        return None
    return ToolCall(name, args)


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in text, separated by whitespace, ';' or ',' (Llama 3.2 joins calls with ';'); None unless
    the whole text is such values."""
    dec, i, out = json.JSONDecoder(), 0, []
    text = text.strip()
    while i < len(text):
        try:
            value, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
    return out


def _calls_from_values(values: list[Any] | None, names: set[str] | None) -> list[ToolCall] | None:
    if not values:
        return None
    flat: list[Any] = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    calls = [_call(v, names) for v in flat]
    return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


class ToolParser:
    """Splits a finished output into (content, calls); calls is empty when the output holds none (content is then
    the whole text). markers: strings that start a call; json_start: a bare JSON value at the start is a call."""

    name = "base"
    markers: tuple[str, ...] = ()
    json_start = False

    def __init__(self, names: set[str] | None = None):
        self.names = names

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        try:
            found = self._parse(text)
        except (ValueError, RecursionError, TypeError, KeyError):
            found = None
        if not found:
            return text, []
        content, calls = found
        return (content if content and content.strip() else None), calls

    def _parse(self, text: str) -> tuple[str, list[ToolCall]] | None:
        raise NotImplementedError

    def _json(self, text: str) -> list[ToolCall] | None:
        m = _FENCE.match(text)
        return _calls_from_values(_json_values(m.group(1) if m else text), self.names)


class HermesParser(ToolParser):
    """Hermes / Qwen: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one or more (the last may lack
    its closing tag when the output ended there)."""

    name = "hermes"
    markers = ("<tool_call>",)
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def _parse(self, text):
        start = text.find("<tool_call>")
        if start < 0:
            return None
        calls = []
        for body in self._BLOCK.findall(text[start:]):
            found = self._json(body)
            if not found:
                return None
            calls += found
        return (text[:start], calls) if calls else None


class Llama3Parser(ToolParser):
    """Llama 3.x: the output is {"name": ..., "parameters": {...}} (several joined by ';'), optionally after
    <|python_tag|>. A python_tag call that is not JSON (built-in tools' Python) stays content."""

    name = "llama3_json"
    markers = ("<|python_tag|>",)
    json_start = True

    def _parse(self, text):
        start = text.find("<|python_tag|>")
        if start >= 0:
            calls = self._json(text[start + len("<|python_tag|>"):].replace("<|eom_id|>", ""))
            return (text[:start], calls) if calls else None
        calls = self._json(text)
        return ("", calls) if calls else None


class MistralParser(ToolParser):
    """Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (v3 tokenizers) or
    [TOOL_CALLS]name[ARGS]{...} repeated (v11+ tokenizers)."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    _V11 = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[CALL_ID\]\s*\w+\s*)?\[ARGS\]\s*(.*)", re.DOTALL)

    def _parse(self, text):
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return None
        parts = text[start:].split("[TOOL_CALLS]")[1:]
        calls: list[ToolCall] = []
        for part in parts:
            m = self._V11.match(part)
            if m:
                args = _json_values(m.group(2))
                call = _call({"name": m.group(1), "arguments": args[0]}, self.names) \
                    if args and len(args) == 1 else None
                if call is None:
                    return None
                calls.append(call)
                continue
            found = self._json(part)
            if not found:
                return None
            calls += found
        return (text[:start], calls) if calls else None


class GenericParser(ToolParser):
    """Any model: <tool_call> blocks (the format the fallback tool prompt asks for), else an output that is only
    a call as JSON ({"name", "arguments"} or a list of them, maybe in a ```json fence). Only declared tool names
    count, so ordinary JSON answers stay content."""

    name = "generic"
    markers = ("<tool_call>",)
    json_start = True

    def _parse(self, text):
        found = HermesParser(self.names)._parse(text)
        if found:
            return found
        calls = self._json(text)
        return ("", calls) if calls else None


PARSERS = {p.name: p for p in (HermesParser, Llama3Parser, MistralParser, GenericParser)}


def parser_for(template: str | None, names: set[str] | None, architecture: str | None = None) -> ToolParser:
    """The parser the chat template implies (its call markers), else the architecture's family; a template that
    ignores tools (the fallback prompt asks for <tool_call> blocks) or an unknown family gets the generic one."""
    t = template or ""
    arch = (architecture or "").lower()
    if not template_takes_tools(t):
        cls: type[ToolParser] = GenericParser
    elif "<tool_call>" in t:
        cls = HermesParser
    elif "[TOOL_CALLS]" in t:
        cls = MistralParser
    elif "<|python_tag|>" in t or "<|eom_id|>" in t or "ipython" in t:
        cls = Llama3Parser
    elif "qwen" in arch:
        cls = HermesParser
    elif "mistral" in arch:
        cls = MistralParser
    elif "llama" in arch:
        cls = Llama3Parser
    else:
        cls = GenericParser
    return cls(names)


def parse_forced(text: str, choice: ToolChoice) -> list[ToolCall] | None:
    """Calls from an output the forced_schema grammar shaped; None if it does not parse (e.g. cut by max_tokens)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if choice.mode == "named":
        return [ToolCall(choice.name or "", value)] if isinstance(value, dict) else None
    return _calls_from_values([value], None) if isinstance(value, list) else None


# ---------------- prompt ----------------
def template_for(tokenizer, with_tools: bool) -> str | None:
    """The template apply_chat_template will use (the tool_use one when tools are passed and it exists)."""
    templates = getattr(tokenizer, "chat_templates", None) or {}
    return (templates.get("tool_use") if with_tools else None) or templates.get("default")


def template_takes_tools(template: str | None) -> bool:
    return bool(template) and re.search(r"\btools\b", template or "") is not None


FALLBACK_PROMPT = ("You can call these tools (JSON schemas of their arguments):\n{tools}\n\nTo call a tool, answer "
                   "with only <tool_call>{{\"name\": \"<tool name>\", \"arguments\": {{<arguments>}}}}</tool_call> "
                   "(one block per call). Otherwise answer normally.")


def tool_messages(messages: list[dict], tools: list[Tool], template: str | None) -> tuple[list[dict], dict]:
    """(messages, chat-template kwargs) for a conversation with tools. A template that takes tools gets them as
    `tools=` and assistant tool_calls with arguments as objects (what HF templates read); one that ignores tools
    gets them described in the system message and earlier calls written into the assistant's content."""
    if template_takes_tools(template):
        if "[TOOL_CALLS]" in (template or ""):
            messages = _mistral_ids(messages)
        return messages, ({"tools": [t.spec for t in tools]} if tools else {})
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join("<tool_call>" + json.dumps({"name": c["function"]["name"],
                                                          "arguments": c["function"].get("arguments", {})},
                                                         ensure_ascii=False) + "</tool_call>"
                              for c in m["tool_calls"])
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = ((m.get("content") or "") + "\n" + calls).strip()
        out.append(m)
    if tools:
        text = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t.spec["function"], ensure_ascii=False)
                                                      for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": (out[0].get("content") or "") + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, {}


def _mistral_ids(messages: list[dict]) -> list[dict]:
    """Mistral templates accept only 9-character alphanumeric call ids: ours (call_...) and other servers' become
    their last 9 letters and digits, in the calls and the tool results alike (as vLLM does)."""
    def short(i: object) -> object:
        return (re.sub(r"[^A-Za-z0-9]", "", i)[-9:]).rjust(9, "0") if isinstance(i, str) else i

    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "id": short(c.get("id"))} for c in m["tool_calls"]]}
        if m.get("tool_call_id") is not None:
            m = {**m, "tool_call_id": short(m["tool_call_id"])}
        out.append(m)
    return out


def chat_prompt(engine, messages: list[dict], params, template_kwargs: dict | None) -> tuple[list[int], int, int]:
    """engine.chat_prompt with chat-template kwargs (tools=...)."""
    return engine.chat_prompt(messages, params, template_kwargs=template_kwargs or None)


def keep_markers(tokenizer, parser: ToolParser, params) -> None:
    """A call marker that is a special token ([TOOL_CALLS], <|python_tag|>) would be dropped from the text by
    skip_special_tokens: keep special tokens in the output then (vLLM does the same)."""
    special = {tokenizer.token_to_id(m) for m in parser.markers} & set(getattr(tokenizer, "all_special_ids", ()))
    if special - {None}:
        params.skip_special_tokens = False


# ---------------- streaming ----------------
@dataclass
class _Partial:
    """A call as streamed so far: its id, name (once known), argument text so far, and what has been sent."""

    id: str
    name: str | None = None
    args: str = ""
    header_sent: bool = False
    args_sent: int = 0


_ARG_KEYS = ("parameters", "arguments")


class _CallScanner:
    """Reads calls as JSON while the output grows, so they stream as they are written (the argument text in
    chunks): `[{"name": "f", "parameters": {...}}, ...]` (tool_choice required; Mistral's list), bare call objects
    one after another (Hermes blocks, Llama 3 JSON), or the named function's arguments object. Tracks JSON nesting
    and strings character by character; only the call objects' own keys are looked at. names: the declared tools
    (a call with another name is never streamed; None: any)."""

    def __init__(self, named: str | None, names: set[str] | None = None):
        self.named, self.names = named, names
        self.calls: list[_Partial] = [_Partial(_new_id(), named)] if named else []
        self.text = ""
        self.depth = 0
        self.item = 0  # the nesting inside a call object: 1 (bare objects) or 2 (in a list), set by the first bracket
        self.in_str = self.esc = False
        self.key: str | None = None  # the item key whose value is being read
        self.expect = ""  # at item level: "key", ":", "value", "," (after a value)
        self.start = -1  # where the current item-level string or value began

    def feed(self, text: str) -> None:
        base = len(self.text)
        self.text += text
        if self.named is not None:
            self.calls[0].args = self.text.strip()
            return
        for j, ch in enumerate(text, base):
            self._char(ch, j)
        if self.calls and self.key in _ARG_KEYS and self.start >= 0 and self.expect == "in-value":
            self.calls[-1].args = self.text[self.start:]

    def _char(self, ch: str, j: int) -> None:
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
                if self.depth == self.item:
                    self._string_end(j)
            return
        if ch.isspace():
            return
        item = self.item
        if self.depth == item and self.expect == "value":
            self.start, self.expect = j, "in-value"
        if ch == '"':
            self.in_str = True
            if self.depth == item and self.expect == "key":
                self.start = j
        elif ch in "{[":
            if self.depth == 0 and not self.item:
                self.item = item = 1 if ch == "{" else 2
            self.depth += 1
            if self.depth == item and ch == "{":
                self.calls.append(_Partial(_new_id()))
                self.expect = "key"
        elif ch in "}]":
            if self.depth == item and self.expect == "in-value":  # a scalar value ends at the item's end
                self._value_end(j)
            self.depth = max(0, self.depth - 1)
            if self.depth == item and self.expect == "in-value":  # an object or array value closed
                self._value_end(j + 1)
        elif self.depth == item:
            if ch == ":" and self.expect == ":":
                self.expect = "value"
            elif ch == ",":
                if self.expect == "in-value":
                    self._value_end(j)
                self.expect = "key"

    def _string_end(self, j: int) -> None:
        raw = self.text[self.start:j + 1]
        if self.expect == "key":
            self.key = _loads(raw)
            self.expect = ":"
        elif self.expect == "in-value":
            self._value_end(j + 1)

    def _value_end(self, end: int) -> None:
        raw = self.text[self.start:end]
        if self.calls and self.key == "name":
            name = _loads(raw)
            ok = isinstance(name, str) and (self.names is None or name in self.names)
            self.calls[-1].name = name if ok else None
        elif self.calls and self.key in _ARG_KEYS:
            self.calls[-1].args = raw
        self.expect, self.key, self.start = ",", None, -1


def _loads(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _new_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolStream:
    """One output's text, fed delta by delta. feed() returns the content that is safe to send now (text known not
    to start a call); call_deltas() the OpenAI tool_calls deltas due: a call streams as it is written (its header
    once the name is complete and declared, then the argument text in chunks), forced or parsed; finish() returns
    (the rest of the content, the calls), the parser's reading of the whole output deciding. Without calls, all
    text comes out as content, in order."""

    def __init__(self, parser: ToolParser | None, forced: ToolChoice | None = None):
        self.parser, self.forced = parser, forced
        self.pending = ""  # text not sent yet
        self.holding = forced is not None  # a (possible) call has begun: hold everything until finish
        self.sent_any = False
        self.scanner = _CallScanner(forced.name if forced.mode == "named" else None) if forced else None
        self.partials: list[_Partial] = []

    def _scan(self, text: str) -> None:
        self.scanner.feed(text)
        self.partials = self.scanner.calls

    def _hold(self, call_text: str) -> None:
        """A parsed call begins: hold from here on, and read the call's JSON as it comes."""
        self.holding = True
        self.scanner = _CallScanner(None, self.parser.names)
        self._scan(call_text)

    def feed(self, text: str) -> str:
        self.pending += text
        if self.scanner is not None:
            self._scan(text)
            return ""
        if self.holding:
            return ""
        if self.parser is None:
            out, self.pending = self.pending, ""
            return out
        p = self.parser
        if p.json_start and not self.sent_any:
            head = self.pending.lstrip()
            if not head:
                return ""
            if head[0] in "{[":  # a JSON call
                self._hold(head)
                return ""
            if head.startswith("```"):  # maybe one in a code fence: parsed at the end
                self.holding = True
                return ""
            if "```".startswith(head):
                return ""
        found = [(i, m) for m in p.markers if (i := self.pending.find(m)) >= 0]
        if found:
            cut, marker = min(found)
            out, self.pending = self.pending[:cut], self.pending[cut:]
            self._hold(self.pending[len(marker):])
        else:
            keep = max((k for m in p.markers for k in range(1, len(m)) if self.pending.endswith(m[:k])), default=0)
            out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        self.sent_any |= bool(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the content not sent yet, the calls) once the output is complete."""
        text, self.pending = self.pending, ""
        if self.forced is not None:
            calls = parse_forced(text, self.forced) or []
        elif self.parser is None or not self.holding:
            return text, []
        else:
            content, calls = self.parser.parse(text)
            if not calls:
                calls, text = [], content or ""
        streamed = any(p.header_sent for p in self.partials)
        for call, part in zip(calls, self.partials):  # keep the ids (and argument text) already streamed
            if part.name == call.name and _loads(part.args) == call.arguments:
                call.id = part.id
            else:
                break
        else:
            if calls and len(self.partials) >= len(calls):
                return ("" if self.forced is not None else content or ""), calls
        if not calls:  # no valid call (cut by max_tokens): content, unless part of a call went out already
            return ("" if streamed else text), []
        if not streamed:
            self.partials = [_Partial(c.id, c.name, c.arguments_json) for c in calls]
        else:  # the streamed calls that match stay; those after them come whole
            self.partials = self.partials[:sum(p.header_sent for p in self.partials)] + \
                [_Partial(c.id, c.name, c.arguments_json) for c in calls[sum(p.header_sent for p in self.partials):]]
        return ("" if self.forced is not None else content or ""), calls

    def call_deltas(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The OpenAI tool_calls delta entries due since the last call (at most `limit` calls)."""
        out = []
        for k, p in enumerate(self.partials[:limit]):
            if p.name is None:
                break
            if not p.header_sent:
                p.header_sent, p.args_sent = True, len(p.args)
                out.append({"index": k, "id": p.id, "type": "function",
                            "function": {"name": p.name, "arguments": p.args}})
            elif len(p.args) > p.args_sent:
                out.append({"index": k, "function": {"arguments": p.args[p.args_sent:]}})
                p.args_sent = len(p.args)
        return out


@dataclass
class ToolSetup:
    """What a chat request with tools needs from request to response."""

    tools: list[Tool]
    choice: ToolChoice
    parser: ToolParser | None = None  # set once the model's template is known (tool_choice auto)

    @property
    def parsing(self) -> bool:
        return self.choice.mode != "none" and bool(self.tools)

    @property
    def forced(self) -> ToolChoice | None:
        return self.choice if self.choice.mode in ("required", "named") else None

    def stream(self) -> ToolStream:
        return ToolStream(self.parser, self.forced)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished output; calls is empty when it holds none (content = the text)."""
        if not self.parsing:
            return text, []
        if self.forced is not None:
            calls = parse_forced(text, self.forced)
            return (None, calls) if calls else (text, [])
        return self.parser.parse(text) if self.parser is not None else (text, [])

    def prepare(self, engine, messages: list[dict], params) -> tuple[list[int], int, int]:
        """Render the prompt with the tools (from the model's template) and pick the output parser."""
        tok = engine.tokenizer
        template = template_for(tok, bool(self.tools))
        msgs, kwargs = tool_messages(messages, self.tools, template)
        if self.parsing and self.forced is None:
            arch = getattr(getattr(engine, "model_config", None), "architecture", None)
            self.parser = parser_for(template, {t.name for t in self.tools}, arch)
            keep_markers(tok, self.parser, params)
        return chat_prompt(engine, msgs, params, kwargs)
