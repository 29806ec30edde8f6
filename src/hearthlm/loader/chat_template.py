"""Chat templates (jinja2) rendered the way transformers renders them, without importing transformers.

Same environment as transformers' `apply_chat_template`: an immutable sandbox, trim_blocks + lstrip_blocks, the
loopcontrols extension, a `{% generation %}` block that renders its body, the `raise_exception` and
`strftime_now` globals, a `tojson` filter that keeps non-ASCII text, and the guarded `dict` / `namespace`.
Variables: messages, tools, documents, add_generation_prompt, the named special tokens (bos_token, eos_token, ...),
then the caller's keyword arguments."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

# a message's reasoning arrives under any of these names; templates read the first (transformers aliases them)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict[str, str],
                **kwargs: Any) -> str:
    """The conversation rendered by `template`. Keys whose value is None are dropped from each message (many
    templates print "None" otherwise), as transformers does. Raises jinja2.TemplateError on a rejected chat."""
    chat = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    variables = {**special_tokens, **kwargs}
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    return compile_template(template).render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)


@lru_cache(maxsize=16)
def compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps
        the body unchanged."""
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:
        """`dict(...)` and `dict.fromkeys(...)` without exposing the dict type itself to the template."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore-prefixed attributes."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)
