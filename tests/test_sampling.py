"""Sampler semantics: seeds, filters, penalties; unit-level and through the engine."""
from __future__ import annotations

import pytest
import torch

from hearthlm import SamplingParams
from hearthlm.runtime.sampler import SampleRequest, apply_penalties, filter_logits, sample

from .conftest import prompts_of


def req(params, prompt=(1, 2, 3), output=(), seed=7):
    return SampleRequest(params, list(prompt), list(output), seed, [2])


def test_top_k_top_p_min_p_never_emit_excluded_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 200) * 1.5
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True)
    allowed_k = set(order[:5].tolist())
    cum = probs[order].cumsum(0)
    allowed_p = set(order[: int((cum < 0.5).sum()) + 1].tolist())
    allowed_min = set((probs >= 0.2 * probs.max()).nonzero().flatten().tolist())
    for params, allowed in [(SamplingParams(top_k=5), allowed_k), (SamplingParams(top_p=0.5), allowed_p),
                            (SamplingParams(min_p=0.2), allowed_min)]:
        seen = {sample(logits, [req(params, output=[0] * i, seed=i)]).token_ids[0] for i in range(300)}
        assert seen <= allowed and len(seen) > 1


def test_filter_keeps_the_token_that_crosses_top_p():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    out = filter_logits(logits, torch.tensor([0]), torch.tensor([0.7]), torch.tensor([0.0]))
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2])


def test_penalties_change_logits_as_specified():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    l1 = logits.clone()
    apply_penalties(l1, [req(SamplingParams(repetition_penalty=2.0), prompt=[0], output=[1])])
    assert l1.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    l2 = logits.clone()
    apply_penalties(l2, [req(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[3],
                             output=[2, 2, 0])])
    assert l2.tolist() == [[2.0 - 0.5 - 0.25, -2.0, 1.0 - 0.5 - 0.5, 0.5]]


def test_min_tokens_masks_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 10.0, 0.0]])  # token 2 is the stop id
    assert sample(logits, [req(SamplingParams(temperature=0, min_tokens=2))]).token_ids[0] != 2
    assert sample(logits, [req(SamplingParams(temperature=0, min_tokens=2), output=[1, 1])]).token_ids[0] == 2


def test_seed_reproduces_independent_of_batch(engine_for):
    llm = engine_for("llama")
    prompts = prompts_of(6, [7, 19, 4], seed=11)
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate([prompts[0]], sp)[0].outputs[0].token_ids
    mixed = llm.generate(prompts, [sp] + [SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True)] * 5)
    assert mixed[0].outputs[0].token_ids == alone
    other = llm.generate([prompts[0]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=99,
                                                      ignore_eos=True))[0].outputs[0].token_ids
    assert other != alone


def test_seeded_output_survives_preemption(engine_for):
    small = engine_for("llama", num_kv_blocks=24, max_num_seqs=8)
    big = engine_for("llama")
    prompts = prompts_of(8, [20, 35, 12, 30], seed=3)
    sps = [SamplingParams(temperature=0.9, max_tokens=48, seed=i, ignore_eos=True) for i in range(8)]
    before = small.engine.scheduler.num_preemptions
    a = small.generate(prompts, sps)
    assert small.engine.scheduler.num_preemptions > before
    b = big.generate(prompts, sps)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_n_samples_differ_and_reproduce(engine_for):
    llm = engine_for("llama")
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=5, ignore_eos=True)
    a = llm.generate([[5, 6, 7, 8]], sp)[0]
    b = llm.generate([[5, 6, 7, 8]], sp)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"), (dict(top_k=-5), "top_k"), (dict(n=0), "n"),
    (dict(logprobs=50), "logprobs"), (dict(stop=[""]), "stop"), (dict(min_p=2.0), "min_p"),
    (dict(presence_penalty=5.0), "presence_penalty"), (dict(truncate="right"), "truncate"),
    (dict(top_k=10**20), "top_k"), (dict(seed=2**80), "seed"), (dict(seed="7"), "seed"), (dict(stop=5), "stop"),
    (dict(stop={"a": 1}), "stop"), (dict(stop=[1]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[2**40]), "stop_token_ids"), (dict(stop_token_ids=7), "stop_token_ids"),
    (dict(n=10**20), "n"), (dict(n=True), "n"), (dict(max_tokens=10**20), "max_tokens"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(logprobs=10**9), "logprobs"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="0.5"), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(ignore_eos="yes"), "ignore_eos"), (dict(stop=["x" * 5000]), "stop"),
])
def test_bad_sampling_params_raise_typed_errors(kwargs, match):
    from hearthlm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kwargs)


def test_keyed_exponential_race_draws_follow_the_distribution():
    from hearthlm.runtime.sampler import exponential_noise, row_key

    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    keys = torch.tensor([row_key(seed, step) for seed in range(40) for step in range(500)])
    draws = (probs[None, :] / exponential_noise(keys, 5)).argmax(-1)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert (freq - probs).abs().max() < 0.01  # 20,000 draws: standard error <= 0.0035
    again = exponential_noise(keys[:7], 5)
    assert torch.equal(again, exponential_noise(keys, 5)[:7])  # a row's draw does not depend on the batch


def test_vocab_dependent_checks_and_dialect_names():
    from hearthlm.errors import InvalidRequestError
    from hearthlm.sampling import renamed

    SamplingParams(top_k=100, stop_token_ids=[99]).validate(vocab_size=100)
    for kw, param in [(dict(top_k=101), "top_k"), (dict(stop_token_ids=[100]), "stop_token_ids")]:
        with pytest.raises(InvalidRequestError, match=param) as e:
            SamplingParams(**kw).validate(vocab_size=100)
        err = renamed(e.value, {param: f"options.{param}"})
        assert err.param == f"options.{param}" and str(err).startswith(f"options.{param} ")


def test_a_row_that_cannot_be_sampled_fails_alone():
    """top_k past what a tensor holds (set after validation): the batch falls back to rows one by one; the bad
    row records its error and the others draw exactly what they draw alone."""
    from hearthlm.runtime.sampler import sample_tokens

    torch.manual_seed(1)
    logits = torch.randn(4, 300)
    reqs = [req(SamplingParams(temperature=0.7, top_k=20), seed=3), req(SamplingParams(temperature=0)),
            req(SamplingParams(temperature=1.0, top_k=5), seed=4), req(SamplingParams(temperature=1.2), seed=5)]
    alone = [sample_tokens(logits[i:i + 1], [r]).item() for i, r in enumerate(reqs)]
    reqs[2].params.top_k = 10**20
    tokens = sample_tokens(logits, reqs).tolist()
    assert isinstance(reqs[2].error, Exception)
    assert [t for i, t in enumerate(tokens) if i != 2] == [t for i, t in enumerate(alone) if i != 2]
    assert all(r.error is None for i, r in enumerate(reqs) if i != 2)
