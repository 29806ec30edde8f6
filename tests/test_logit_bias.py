"""logit_bias (OpenAI's): a value in [-100, 100] added to a token's logit before sampling. Checked field by field,
against the exact distribution over thousands of seeds, greedy through the engine (alone and in a batch, where
it changes only its own request), and through the openai SDK against a live server (tests/e2e/test_openai.py)."""
from __future__ import annotations

import math

import pytest
import torch

from hearthlm import SamplingParams
from hearthlm.errors import InvalidRequestError
from hearthlm.runtime.sampler import SampleRequest, sample

from .conftest import prompts_of


@pytest.mark.parametrize("bias, says", [
    ({"x": 1}, "keys must be token ids"), ({"-1": 1}, "keys must be token ids"), ({5: 100.5}, "[-100, 100]"),
    ({5: float("nan")}, "[-100, 100]"), ({5: "1"}, "[-100, 100]"), ([1, 2], "object mapping"),
    ({i: 1 for i in range(1025)}, "at most 1024"),
])
def test_bad_values_name_the_field(bias, says):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(logit_bias=bias)
    assert e.value.param == "logit_bias" and says in str(e.value)


def test_keys_read_as_ids_and_checked_against_the_vocabulary():
    p = SamplingParams(logit_bias={"7": 3, 9: -100})
    assert p.logit_bias == {7: 3, 9: -100} and p.needs_penalties
    assert SamplingParams(logit_bias={}).logit_bias is None and not SamplingParams(logit_bias={}).needs_penalties
    with pytest.raises(InvalidRequestError, match=r"\[0, 8\)"):
        p.validate(vocab_size=8)


def test_draws_follow_the_biased_distribution_exactly():
    """4,000 seeds, one draw each, against softmax(logits + bias): every token's count within 4.5 standard
    deviations, and a -100 bias (probability ~e^-100) never drawn."""
    logits = torch.tensor([[1.0, 0.5, 2.0, -1.0, 0.0, 1.5]])
    bias = {0: 1.5, 2: -100, 4: 2.0, 5: -0.75}
    n = 4000
    reqs = [SampleRequest(SamplingParams(temperature=0.8, seed=s, logit_bias=bias, max_tokens=4), [1], [], s, [])
            for s in range(n)]
    got = sample(logits.expand(n, -1).contiguous(), reqs).token_ids
    want = torch.softmax((logits[0] + torch.tensor([1.5, 0, -100, 0, 2.0, -0.75])) / 0.8, -1)
    counts = torch.bincount(torch.tensor(got), minlength=6)
    assert counts[2] == 0
    for tok in range(6):
        p = want[tok].item()
        assert abs(counts[tok].item() - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1, (tok, counts.tolist(), p)


def test_logprobs_stay_the_models():
    logits = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0]]), -1)
    req = SampleRequest(SamplingParams(temperature=0, logit_bias={0: 100}, logprobs=0), [1], [], 0, [])
    out = sample(logits.clone(), [req])
    assert out.token_ids == [0] and out.logprobs[0][0] == pytest.approx(logits[0, 0].item())


def test_greedy_bias_steers_only_its_own_request(engine_for):
    llm = engine_for("llama", max_num_seqs=4)
    prompts = prompts_of(3, [9, 14, 6], seed=5)
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    forced = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={123: 100})
    banned = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={base[2][0]: -100})
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, [forced, plain, banned], use_tqdm=False)]
    assert outs[0] == [123] * 6
    assert outs[1] == base[1]  # the batch neighbour's tokens are untouched
    assert outs[2][0] != base[2][0]
    alone = llm.generate([prompts[2]], banned, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == outs[2]
