"""The README's table of request fields against a live server: every row is sent (✔ and ○ answer 200, ✘ a 400
naming the field), every field a request model declares has a row, and a field outside the table is refused."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
MSGS = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
    "type": "object", "properties": {"x": {"enum": ["a", "b"]}}, "required": ["x"]}}}
BASE = {
    "/v1/chat/completions": {"model": "smollm2", "messages": MSGS, "max_tokens": 2},
    "/v1/completions": {"model": "smollm2", "prompt": "hi", "max_tokens": 2},
    "/api/chat": {"model": "smollm2", "messages": MSGS, "stream": False, "options": {"num_predict": 2}},
    "/api/generate": {"model": "smollm2", "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
    "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
    "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
}
# field -> what to merge into the base body to set it (a non-default value); per route where it differs
EXAMPLES: dict[str, dict] = {
    "model": {"model": "smollm2"}, "messages": {"messages": MSGS}, "prompt": {"prompt": "hello"},
    "max_tokens": {"max_tokens": 3}, "max_completion_tokens": {"max_completion_tokens": 3}, "n": {"n": 2},
    "temperature": {"temperature": 0.5}, "top_p": {"top_p": 0.9}, "presence_penalty": {"presence_penalty": 0.5},
    "frequency_penalty": {"frequency_penalty": 0.5}, "seed": {"seed": 1}, "stop": {"stop": ["\n"]},
    "stream": {"stream": True}, "stream_options": {"stream": True, "stream_options": {"include_usage": True}},
    "logit_bias": {"logit_bias": {"42": 5}}, "top_logprobs": {"logprobs": True, "top_logprobs": 2},
    "echo": {"echo": True}, "response_format": {"response_format": {"type": "json_object"}},
    "tools": {"tools": [TOOL]}, "tool_choice": {"tools": [TOOL], "tool_choice": "required"},
    "parallel_tool_calls": {"tools": [TOOL], "parallel_tool_calls": False}, "top_k": {"top_k": 5},
    "min_p": {"min_p": 0.1}, "repetition_penalty": {"repetition_penalty": 1.1}, "min_tokens": {"min_tokens": 1},
    "ignore_eos": {"ignore_eos": True}, "stop_token_ids": {"stop_token_ids": [2]},
    "include_stop_str_in_output": {"include_stop_str_in_output": True},
    "skip_special_tokens": {"skip_special_tokens": False}, "truncate": {"truncate": "left"}, "user": {"user": "u"},
    "store": {"store": False}, "metadata": {"metadata": {"k": "v"}}, "service_tier": {"service_tier": "auto"},
    "prompt_cache_key": {"prompt_cache_key": "k"}, "safety_identifier": {"safety_identifier": "s"},
    "functions": {"functions": [{"name": "f"}]}, "function_call": {"function_call": {"name": "f"}},
    "best_of": {"best_of": 2}, "suffix": {"suffix": "x"}, "reasoning_effort": {"reasoning_effort": "low"},
    "system": {"system": "Be brief."}, "raw": {"raw": True}, "context": {"context": [1, 2, 3]},
    "format": {"format": "json"}, "options": {"options": {"num_predict": 2, "temperature": 0.5}},
    "keep_alive": {"keep_alive": "5m"}, "think": {"think": True}, "template": {"template": "{{ .Prompt }}"},
    "images": {"images": ["aGk="]}, "inputs": {"inputs": "hello"},
}
ROUTE_EXAMPLES = {("/v1/chat/completions", "logprobs"): {"logprobs": True},
                  ("/v1/completions", "logprobs"): {"logprobs": 2},
                  ("/generate", "stream"): {"stream": True},
                  ("/v1/completions", "tool_choice"): {"tool_choice": "auto"},
                  ("/v1/completions", "parallel_tool_calls"): {"parallel_tool_calls": False}}
TGI_PARAMS = {"max_new_tokens": 3, "temperature": 0.5, "top_k": 5, "top_p": 0.9, "do_sample": True, "seed": 1,
              "stop": ["\n"], "repetition_penalty": 1.1, "frequency_penalty": 0.5, "details": True,
              "return_full_text": True, "truncate": 8, "top_n_tokens": 2,
              "grammar": {"type": "regex", "value": "[a-z]+"}, "best_of": 2, "typical_p": 0.5, "watermark": True,
              "decoder_input_details": True, "adapter_id": "x"}


def table() -> list[tuple[str, str, str]]:
    """(route, field, mark) for every row between the README's fields markers."""
    text = README.read_text()
    body = text[text.index("<!-- fields:begin -->"):text.index("<!-- fields:end -->")]
    rows = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`/"):
            continue
        field = cells[1].strip("`")
        for route in re.findall(r"`(/[^`]*)`", cells[0]):
            rows.append((route, field, cells[2]))
    return rows


ROWS = table()


def request_for(route: str, field: str) -> dict:
    body = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE[route].items()}
    if field.startswith("parameters."):
        name = field.split(".", 1)[1]
        body["parameters"] = {**body["parameters"], name: TGI_PARAMS[name]}
        return body
    example = ROUTE_EXAMPLES.get((route, field))
    return {**body, **(example if example is not None else EXAMPLES[field])}


def test_table_is_complete():
    """Every field a request model declares is in the table for its routes, and every row has an example."""
    from hearthlm.serve import ollama, openai, tgi

    declared = {"/v1/chat/completions": openai.ChatRequest, "/v1/completions": openai.CompletionRequest,
                "/api/chat": ollama.ChatBody, "/api/generate": ollama.GenerateBody, "/generate": tgi.Body}
    documented = {(r, f) for r, f, _ in ROWS}
    missing = [(route, name) for route, model in declared.items() for name in model.model_fields
               if name != "parameters" and (route, name) not in documented]
    missing += [("/generate", f"parameters.{name}") for name in tgi.Parameters.model_fields
                if ("/generate", f"parameters.{name}") not in documented]
    assert not missing, f"request fields without a README row: {missing}"
    assert all(mark in ("✔", "○", "✘") for _, _, mark in ROWS)
    for route, field, _ in ROWS:
        request_for(route, field)  # an example exists
    assert len(ROWS) > 100


def test_every_row_is_honoured_or_refused(server):
    """Each row sent alone to its route (concurrently, as clients would): ✔ / ○ -> 200, ✘ -> 400 naming it."""
    def send(row):
        route, field, mark = row
        return row, server.post(route, json=request_for(route, field))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, ROWS))
    bad = []
    for (route, field, mark), r in results:
        if mark == "✘":
            name = field.split(".")[-1]
            if r.status_code != 400 or name not in r.text:
                bad.append((route, field, r.status_code, r.text[:200]))
        elif r.status_code != 200:
            bad.append((route, field, r.status_code, r.text[:200]))
    assert not bad, bad


@pytest.mark.parametrize("route", list(BASE))
def test_a_field_outside_the_table_is_refused(server, route):
    body = request_for(route, "inputs" if route.startswith("/generate") else "model")
    if route.startswith("/generate"):
        body["parameters"]["no_such_parameter"] = 1
        name = "parameters.no_such_parameter"
    else:
        body["no_such_field"] = {"a": 1}
        name = "no_such_field"
    r = server.post(route, json=body)
    assert r.status_code == 400 and name in r.text, r.text
    body = request_for(route, "inputs" if route.startswith("/generate") else "model")
    body["unset_field"] = None  # null: what clients send for fields they leave unset
    assert server.post(route, json=body).status_code == 200
