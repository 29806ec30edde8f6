"""The sampler draws exactly from the distribution its rules define (vLLM v1's order: penalties, temperature,
min-p, top-k, top-p), on the default model's real first-token logits after prompts with many likely next tokens:
a slice of WIDTH columns holding the prompt's tokens and the most likely ones (the draws cost rows x columns; the
rules see a vocabulary of WIDTH).

Test: draws outside the support fail at once; inside it, Pearson's chi-square over bins: tokens expected at least
MIN_EXPECTED times are bins of their own, the rest one bin (coarser bins keep the test valid, and the tail's
noise out of it). A correct sampler's statistic has mean dof and sd sqrt(2 dof); we allow dof + 6 sd, which it
exceeds about never, while a slightly different rule (temperature 0.8 vs 0.85, top_k 20 vs 19, top_p 0.8 vs 0.75)
lands far above it.

20,000 draws per rule, on CPU in CI and on CUDA (marked gpu)."""
from __future__ import annotations

import math

import pytest
import torch

from hearthlm import SamplingParams
from hearthlm.runtime import sampler as S
from hearthlm.runtime.sampler import SampleRequest, noise_at, row_key, sample, sample_tokens

from .conftest import needs_default_model

N_DRAWS = 20_000
CHUNK = 2_000
WIDTH = 8192
MIN_EXPECTED = 5
PROMPT = "My favourite colour is"
REPEATS = "the cat and the dog and the cat and the bird and the"

RULES = {
    "temperature": dict(temperature=0.8),
    "top_k": dict(temperature=0.7, top_k=20),
    "top_p": dict(temperature=0.7, top_p=0.8),
    "min_p": dict(temperature=1.0, min_p=0.1),
    "all": dict(temperature=0.9, top_k=30, top_p=0.9, min_p=0.02),
    "penalties": dict(temperature=0.8, top_k=40, repetition_penalty=1.3, presence_penalty=0.5,
                      frequency_penalty=0.4),
}


def _first_token_logits(prompt: str) -> tuple[torch.Tensor, list[int]]:
    from hearthlm import LLM
    from hearthlm.runtime import runner

    llm = LLM(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=2)
    ids = llm.engine.tokenizer.encode(prompt)
    seen = []
    real = runner.sample_tokens

    def capture(logits, reqs, greedy=None):
        seen.append(logits[0].float().clone())
        return real(logits, reqs, greedy)

    runner.sample_tokens = capture
    try:
        llm.generate([ids], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    finally:
        runner.sample_tokens = real
    return _slice(seen[0], ids)


def _slice(logits: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """WIDTH columns of the row: the prompt's tokens, then the most likely others, in id order; ids remapped."""
    cols = list(dict.fromkeys(ids))
    taken = set(cols)
    for t in logits.topk(WIDTH + len(cols)).indices.tolist():
        if len(cols) == WIDTH:
            break
        if t not in taken:
            cols.append(t)
    cols.sort()
    pos = {t: i for i, t in enumerate(cols)}
    return logits[torch.tensor(cols)].contiguous(), [pos[t] for t in ids]


@pytest.fixture(scope="module")
def real_logits():
    return {name: _first_token_logits(text) for name, text in (("plain", PROMPT), ("repeats", REPEATS))}


def exact_distribution(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """The rules in float64, written independently of the sampler: [V] probabilities."""
    x = logits.double().clone()
    if p.repetition_penalty != 1.0:
        seen = sorted(set(prompt + output))
        v = x[seen]
        x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    x = x / p.temperature
    prob = x.softmax(-1)
    keep = prob >= p.min_p * prob.max()
    if p.top_k > 0:
        keep &= x >= x[keep].sort(descending=True).values[min(p.top_k, int(keep.sum())) - 1]
    q = torch.where(keep, prob, torch.zeros_like(prob))
    q /= q.sum()
    if p.top_p < 1:
        vals, order = q.sort(descending=True)
        before = vals.cumsum(0) - vals
        cut = torch.zeros_like(keep)
        cut[order] = before >= p.top_p
        keep &= ~cut
        keep[x.argmax()] = True
        q = torch.where(keep, prob, torch.zeros_like(prob))
        q /= q.sum()
    return q


def draw(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int], n: int = N_DRAWS,
         device: str = "cpu") -> torch.Tensor:
    """n seeded first-token draws through the sampler, the real row repeated, in chunks -> counts [V]."""
    counts = torch.zeros(logits.shape[0], dtype=torch.int64)
    row = logits.to(device)
    for start in range(0, n, CHUNK):
        seeds = range(start, min(n, start + CHUNK))
        reqs = [SampleRequest(p, list(prompt), list(output), seed, [2]) for seed in seeds]
        batch = row.expand(len(reqs), -1).contiguous()
        tokens = sample(batch, reqs).token_ids if p.needs_penalties else sample_tokens(batch, reqs).tolist()
        counts += torch.bincount(torch.tensor(tokens), minlength=logits.shape[0])
    return counts


def check_rule(name: str, real_logits, device: str = "cpu", n: int = N_DRAWS) -> None:
    kw = RULES[name]
    logits, prompt = real_logits["repeats" if name == "penalties" else "plain"]
    output = prompt[-6:] if name == "penalties" else []  # as if mid-answer: presence/frequency see repeats
    p = SamplingParams(**kw)
    q = exact_distribution(logits, p, prompt, output)
    counts = draw(logits, p, prompt, output, n=n, device=device)
    support = q > 0
    assert int(counts[~support].sum()) == 0, f"{name}: draws outside the support {counts[~support].nonzero()}"
    own = q * n >= MIN_EXPECTED
    expected = torch.cat([q[own], q[~own & support].sum()[None]]) * n
    seen = torch.cat([counts[own], counts[~own].sum()[None]]).double()
    if float(expected[-1]) < MIN_EXPECTED:  # too thin a tail to be a bin: fold it into the smallest own bin
        expected, seen = expected[:-1].clone(), seen[:-1].clone()
        smallest = int(expected.argmin())
        expected[smallest] += float(q[~own].sum()) * n
        seen[smallest] += float(counts[~own].sum())
    dof = len(expected) - 1
    chi2 = float(((seen - expected) ** 2 / expected).sum())
    assert dof == 0 or chi2 < dof + 6 * math.sqrt(2 * dof), f"{name}: chi-square {chi2:.1f} over {dof} dof"


@needs_default_model
@pytest.mark.parametrize("name", list(RULES))
def test_draws_follow_the_exact_distribution(name, real_logits):
    check_rule(name, real_logits)


@pytest.mark.gpu
@needs_default_model
@pytest.mark.parametrize("name", list(RULES))
def test_draws_follow_the_exact_distribution_cuda(name, real_logits):
    check_rule(name, real_logits, device="cuda")


def _inverse_mix32(y: int) -> int:
    m = 0xFFFF_FFFF
    y ^= y >> 16
    y = (y * pow(0x5BD1E995, -1, 2**32)) & m
    y ^= (y >> 15) ^ (y >> 30)
    y = (y * pow(0x7FEB352D, -1, 2**32)) & m
    return y ^ (y >> 16)


def _key_hitting(h: int, token: int) -> int:
    """A row key whose hash at `token` is h."""
    return (_inverse_mix32(h) - token * 0x9E3779B1) & 0xFFFF_FFFF


def _seed_for_key(key: int, step: int = 0) -> int:
    """A seed < 2**32 whose row_key at step is key."""
    return _inverse_mix32(key) ^ S._mix32((step & 0xFFFF_FFFF) ^ S._mix32(0))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_extreme_hashes_give_finite_positive_noise(device):
    for h in (0xFFFF_FFFF, 0xFFFF_FF00, 0xFFFF_FE00, 0, 0x1FF, 0x200):
        key = _key_hitting(h, 5)
        assert S._mix32((key + 5 * 0x9E3779B1) & 0xFFFF_FFFF) == h
        e = noise_at(torch.tensor([key], device=device), torch.tensor([5], device=device)).item()
        assert math.isfinite(e) and S.NOISE_MIN <= e <= S.NOISE_MAX, (hex(h), e)
        row = S.exponential_noise(torch.tensor([key], device=device), 49152)
        assert torch.isfinite(row).all() and (row > 0).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_masked_token_at_the_extreme_hash_never_wins(device):
    """Token 7 is outside top_k and its hash gives the smallest noise: it must not be drawn (was NaN -> argmax)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 1000, device=device)
    logits[0, 7] = logits.min() - 1
    for h in (0xFFFF_FFFF, 0):
        seed = _seed_for_key(_key_hitting(h, 7))
        for params in (SamplingParams(temperature=0.7, top_k=20), SamplingParams(temperature=0.7, top_p=0.5),
                       SamplingParams(temperature=0.7, min_p=0.2), SamplingParams(temperature=1.0)):
            r = SampleRequest(params, [1], [], seed, [2])
            assert row_key(seed, r.step) == _key_hitting(h, 7)
            token = sample_tokens(logits, [r]).item()
            assert 0 <= token < 1000
            if params.top_k > 0 or params.top_p < 1 or params.min_p:
                assert token != 7


@pytest.mark.parametrize("t", [1e-38, 1e-37, 1e-6, 0.0])
def test_tiny_temperatures_are_greedy(t):
    torch.manual_seed(1)
    logits = torch.randn(3, 500)
    p = SamplingParams(temperature=t, top_k=5)
    assert p.greedy
    reqs = [SampleRequest(p, [1], [], seed, [2]) for seed in range(3)]
    assert sample_tokens(logits, reqs).tolist() == logits.argmax(-1).tolist()
    assert sample(logits, reqs).token_ids == logits.argmax(-1).tolist()
    assert not SamplingParams(temperature=1e-5).greedy


@needs_default_model
def test_logprob_bytes_are_the_tokens_own_bytes(default_tokenizer):
    from hearthlm.serve.openai import chat_logprobs

    tok = default_tokenizer
    lone = [i for i in range(tok.vocab_size) if tok.decode([i], skip_special_tokens=False) == "\ufffd"]
    assert lone
    text = "日本語のテキスト"
    ids = tok.encode(text, add_special_tokens=False)
    out = chat_logprobs(tok, ids, [{t: -1.0, lone[0]: -2.0} for t in ids], top_n=2)["content"]
    assert b"".join(bytes(e["bytes"]) for e in out) == text.encode("utf-8")
    assert all(e["token"] == tok.decode([t], skip_special_tokens=False) for e, t in zip(out, ids))
    top = out[0]["top_logprobs"][1]
    assert top["token"] == "\ufffd" and bytes(top["bytes"]) != "\ufffd".encode() and len(top["bytes"]) >= 1
    assert bytes(chat_logprobs(tok, [1], [{1: 0.0}], 0)["content"][0]["bytes"]) == b"<|im_start|>"
