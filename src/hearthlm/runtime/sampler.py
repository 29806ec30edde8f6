"""Sampling: penalties -> logit_bias -> temperature -> min-p -> top-k -> top-p -> seeded sample; raw logprobs.

Filter order (vLLM v1's): after penalties and temperature, min_p drops the tokens whose probability is below
min_p times the most likely token's, then top_k keeps the k most likely of the rest, then top_p keeps the smallest
prefix of those (most likely first, renormalized) whose mass reaches top_p. A temperature below 1e-5 is greedy.
This module is the only sampling path: it runs as torch ops on CPU and CUDA alike, with no separate kernel.

The draw is an exponential race, token = argmax_i p_i / E_i with E_i ~ Exp(1), which picks i with probability
p_i exactly. E_i is a pure function of (seed, step, token id), so a row's draw is the same on any device and in any
batch; E_i is finite and > 0 (see exponential_noise), so a filtered token (p_i == 0) never wins."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..sampling import SamplingParams
from .grammar import GrammarState, apply_bitmask, grammar_bitmask


@dataclass
class SampleRequest:
    """What the sampler needs of one sequence (kept free of engine types)."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    seed: int
    stop_ids: list[int]  # eos + stop_token_ids, masked while len(output) < min_tokens
    num_pending: int = 0  # output tokens sampled by a step still in flight (their ids not read yet)
    error: Exception | None = None  # set when sampling this row raised: the engine fails this request alone
    grammar: GrammarState | None = None  # structured output: the tokens allowed next (runtime/grammar.py)

    @property
    def step(self) -> int:
        return len(self.output_ids) + self.num_pending


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def apply_penalties(logits: torch.Tensor, reqs: list[SampleRequest]) -> None:
    # logits: [R, V] fp32, modified in place
    vocab = logits.shape[1]
    for row, r in enumerate(reqs):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({t for t in r.prompt_ids + r.output_ids if t < vocab}), dtype=torch.long,
                                device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_ids:  # only the tokens seen: no [V] pass
            ids, counts = torch.tensor(r.output_ids, device=logits.device).unique(return_counts=True)
            ids, counts = ids[ids < vocab], counts[ids < vocab]
            logits[row, ids] -= p.frequency_penalty * counts.float() + p.presence_penalty
        if p.logit_bias:  # after the penalties, as an addition to the logits the draw and greedy see
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
            ids_ok = ids < vocab
            bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits[row, ids[ids_ok]] += bias[ids_ok]
        if len(r.output_ids) < p.min_tokens and r.stop_ids:
            logits[row, torch.tensor(r.stop_ids, device=logits.device)] = float("-inf")


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask excluded tokens with -inf, in the module's order: min-p, top-k, top-p; the most likely token is always
    kept. Ties are kept or dropped together, so a row's result never depends on how a sort orders equal logits.
    logits: [R, V] float32 (already temperature-scaled); params: [R] (top_k <= 0, top_p == 1, min_p == 0 = off).

    On CPU only a sorted prefix that provably holds every survivor is sorted (torch.topk): min-p and top-k bound
    it directly, top-p alone by the tokens with p >= (1 - top_p) / V (the rest weigh at most 1 - top_p). CUDA sorts
    whole rows (no host sync). Each decision reads only the row's own values, so the prefix length changes
    nothing."""
    rows, vocab = logits.shape
    dev = logits.device
    top = logits.amax(dim=-1, keepdim=True)
    rel = logits - top  # log(p_i / p_max), as softmax computes it
    log_min_p = min_p[:, None].to(torch.float32).log()  # min_p == 0 -> -inf: keeps all
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    use_p = top_p < 1
    bounded = (min_p > 0) | (top_k > 0)  # survivors of min-p and top-k lie in the prefix
    width = vocab
    if dev.type == "cpu" and rows:
        n_min = (rel >= log_min_p).sum(-1)
        bound = torch.minimum(n_min, k)
        tau = ((1 - top_p.double()) / vocab).log().float()[:, None]
        n_p = (rel - (rel.exp().sum(-1, keepdim=True)).log() >= tau).sum(-1)  # p_i >= (1 - top_p) / V
        bound = torch.where(bounded, bound, torch.where(use_p, n_p, torch.full_like(k, vocab)))
        width = int(bound.max()) + 1
    if width * 8 > vocab:
        width, bound = vocab, None
    vals, order = logits.topk(width, dim=-1) if width < vocab else logits.sort(dim=-1, descending=True)
    if bound is not None:  # ties at a row's bound must lie inside the prefix, else sort whole rows
        edge = vals.gather(1, (bound.clamp(min=1) - 1)[:, None])[:, 0]
        if bool((edge <= vals[:, -1]).any()):
            vals, order = logits.sort(dim=-1, descending=True)
            width = vocab
        else:
            vals, order = vals[:, :-1], order[:, :-1]
            width -= 1
    prel = vals - top
    keep = prel >= log_min_p
    kth = vals.gather(1, (k.clamp(max=width) - 1)[:, None])
    keep &= (vals >= kth) | (k > width)[:, None]  # k > width: the prefix lies wholly inside the top k
    keep[:, 0] = True
    if bool(use_p.any()):
        e = prel.exp().masked_fill(~keep, 0.0)
        cum = e.cumsum(dim=-1)
        # renormalize over the survivors: all in the prefix when bounded, else the whole row
        total = torch.where(bounded, cum[:, -1], rel.exp().sum(-1))[:, None]
        ranks = torch.arange(width, device=dev)[None, :]
        start = torch.ones_like(keep)
        start[:, 1:] = vals[:, 1:] != vals[:, :-1]
        first = torch.where(start, ranks, torch.zeros_like(ranks)).cummax(dim=-1).values  # each tie group's start
        before = (cum - e).gather(1, first)
        keep &= (before < top_p[:, None].to(torch.float32) * total) | ~use_p[:, None]
        keep[:, 0] = True
    out = torch.full_like(logits, float("-inf"))
    return out.scatter_(1, order, vals.masked_fill(~keep, float("-inf")))


_M32 = 0xFFFF_FFFF


def _mix32(x):
    """32-bit integer hash (lowbias32 shape, multipliers < 2**31 so int64 products never overflow); works on
    Python ints and int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def row_key(seed: int, step: int) -> int:
    """Stream key of one sequence's draw at one step (host side)."""
    return _mix32((seed & _M32) ^ _mix32((step & _M32) ^ _mix32((seed >> 32) & _M32)))


def exponential_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R] int64 keys -> [R, vocab] float32 Exp(1) draws, each finite and > 0; a pure function of (key, token id),
    so a row's draw is the same on any device and in any batch."""
    return noise_at(keys[:, None], torch.arange(vocab, device=keys.device, dtype=torch.int64)[None, :])


NOISE_MIN = 5.9604641e-08  # -log1p(-2**-24) rounded down: the smallest draw
NOISE_MAX = 16.635533  # -log1p(-(1 - 2**-24)) = 24 ln 2 rounded up: the largest draw


def noise_at(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws at (key, token id) pairs (int64, broadcastable) -> float32 in [NOISE_MIN, NOISE_MAX].

    Bound: m = h >> 9 is an integer in [0, 2**23 - 1], so u = (m + 0.5) * 2**-23 is exact (in float64, and even in
    float32: m + 0.5 needs at most 24 significant bits) and lies in [2**-24, 1 - 2**-24], strictly inside (0, 1).
    E = -log1p(-u): -u is exact, 1 - u >= 2**-24 keeps the log finite (E <= 24 ln 2), and u >= 2**-24 makes
    E >= ~2**-24 > 0, never 0 (the old float32 form ((h >> 8) + 0.5) / 2**24 rounded 2**24 - 0.5 up to 2**24, so
    u == 1.0 and E == 0 once in 2**24 tokens, and the race divided by zero). The log runs in float64 and is rounded
    once to float32, so CPU and CUDA agree but for a float64 last-bit tie."""
    h = _mix32((keys + ids * 0x9E3779B1) & _M32)
    u = ((h >> 9).to(torch.float64) + 0.5) * (1.0 / (1 << 23))
    return torch.log1p(u.neg_()).neg_().to(torch.float32)


@functools.cache
def _argmax_block(vocab: int) -> int | None:
    """A divisor of vocab near 1024 (49,152 -> 1024), or None."""
    return next((c for c in range(1024, 4097) if vocab % c == 0), None) or \
        next((c for c in range(1023, 255, -1) if vocab % c == 0), None)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) (the first index of each row's maximum, NaN counting as the maximum). On CPU as two
    vectorized passes: the block maxima, then an argmax over the winning block, because torch's CPU argmax walks a
    row one element at a time (several times slower over a vocabulary). logits: [R, V] -> [R]."""
    r, vocab = logits.shape
    block = _argmax_block(vocab)
    if logits.device.type != "cpu" or block is None or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    n = vocab // block
    blocks = logits.view(r * n, block)
    best = blocks.amax(-1).view(r, n).argmax(-1)  # [R] first block holding the maximum (both propagate NaN)
    rows = best if r == 1 else best + torch.arange(0, r * n, n)
    return best * block + blocks.index_select(0, rows).argmax(-1)


def needs_host_sampling(params: SamplingParams) -> bool:
    """Penalties, min_tokens and logprobs read the sequence's token history on the host; a grammar's mask needs
    every earlier token accepted by its matcher."""
    return params.logprobs is not None or params.needs_penalties or bool(params.min_tokens) \
        or params.structured is not None


def sample_tokens(logits: torch.Tensor, reqs: list[SampleRequest], greedy: torch.Tensor | None = None) -> torch.Tensor:
    """Token per row on logits' device, without a host sync. logits: [R, V] (penalties already applied);
    greedy: the argmax if already computed (CUDA graphs emit it).

    If sampling the batch raises (a row's parameters the batch cannot hold), the rows are sampled one by one:
    a row that raises keeps its argmax and records the error in its SampleRequest.error; the others get the
    tokens they would get in any batch (a row's draw depends only on its own logits, seed and step)."""
    try:
        return _sample_tokens(logits, reqs, greedy)
    except Exception:  # noqa: BLE001 - isolated below, row by row
        pass
    rows = []
    for i, r in enumerate(reqs):
        g = None if greedy is None else greedy[i:i + 1]
        try:
            rows.append(_sample_tokens(logits[i:i + 1], [r], g))
        except Exception as e:  # noqa: BLE001 - this request fails alone
            r.error = r.error or e
            rows.append(greedy_tokens(logits[i:i + 1]) if g is None else g)
    return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long, device=logits.device)


def _sample_tokens(logits: torch.Tensor, reqs: list[SampleRequest], greedy: torch.Tensor | None = None) -> torch.Tensor:
    tokens = greedy_tokens(logits) if greedy is None else greedy
    rand_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if not rand_rows:
        return tokens
    dev = logits.device
    params = [reqs[i].params for i in rand_rows]
    idx = torch.tensor(rand_rows, device=dev)
    sub = logits[idx].float() / torch.tensor([p.temperature for p in params], device=dev)[:, None]
    if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
        sub = filter_logits(sub, torch.tensor([p.top_k for p in params], device=dev),
                            torch.tensor([p.top_p for p in params], device=dev),
                            torch.tensor([p.min_p for p in params], device=dev))
    keys = torch.tensor([row_key(reqs[i].seed, reqs[i].step) for i in rand_rows], device=dev)
    tokens = tokens.clone()
    tokens[idx] = race(sub, keys)
    return tokens


RACE_WINDOW = 20.0  # > log(NOISE_MAX / NOISE_MIN) = 19.45: a token this far below the top can never win


def race(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One seeded draw per row from softmax(logits): argmax_i p_i / E_i (an exponential race == a multinomial draw,
    keyed per sequence and step, so batch-independent); ties go to the lowest token id. A -inf logit is never drawn:
    its p is exactly 0, E is finite and > 0, so its score is 0 while the top token's is > 0.
    logits: [R, V] float32 (tempered, filtered); keys: [R] int64 -> [R] token ids.

    On CPU the noise is computed only where it can matter: the top token scores at least p_max / NOISE_MAX, and a
    token with log(p_i / p_max) < -RACE_WINDOW at most p_i / NOISE_MIN < p_max / NOISE_MAX, so it cannot win (nor
    tie). The result is the full race's, at a fraction of the hashing. CUDA races over whole rows (no host sync)."""
    rows, vocab = logits.shape
    probs = logits.softmax(dim=-1)
    if logits.device.type != "cpu":
        return probs.div_(exponential_noise(keys, vocab)).argmax(dim=-1)
    rel = logits - logits.amax(dim=-1, keepdim=True)
    r, ids = (rel >= -RACE_WINDOW).nonzero(as_tuple=True)
    scores = probs[r, ids] / noise_at(keys[r], ids)
    best = torch.full((rows,), -1.0).scatter_reduce_(0, r, scores, "amax")
    win = scores == best[r]
    out = torch.full((rows,), vocab, dtype=torch.int64).scatter_reduce_(0, r[win], ids[win], "amin")
    return torch.where(out < vocab, out, greedy_tokens(logits))  # a row without candidates (NaN logits): argmax


def sample(logits: torch.Tensor, reqs: list[SampleRequest]) -> SampleResult:
    """logits: [R, V] fp32 raw model logits, one row per request. A row whose penalties or logprobs raise records
    the error in its SampleRequest.error; the other rows are unaffected. Grammar masks apply after penalties and
    logit_bias; logprobs stay the model's."""
    states = [r.grammar for r in reqs]
    bitmask = grammar_bitmask(states, logits.shape[1])  # host work first: on CUDA the step may still be running
    want_lp = [r.params.logprobs for r in reqs]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(n is not None for n in want_lp) else None
    penalized = any(r.params.needs_penalties or r.params.min_tokens for r in reqs)
    if penalized or bitmask is not None:
        logits = logits.clone()
    if penalized:
        for row, r in enumerate(reqs):
            try:
                apply_penalties(logits[row:row + 1], [r])  # a view: penalizes logits in place
            except Exception as e:  # noqa: BLE001 - this request fails alone
                r.error = r.error or e
    if bitmask is not None:
        apply_bitmask(logits, bitmask, states)
    tokens = sample_tokens(logits, reqs)
    token_list = tokens.tolist()
    logprobs: list[dict[int, float] | None] = []
    for row, n in enumerate(want_lp):
        if n is None or reqs[row].error is not None:
            logprobs.append(None)
            continue
        try:
            logprobs.append(_logprobs(raw_logprobs[row], token_list[row], n))
        except Exception as e:  # noqa: BLE001 - this request fails alone
            reqs[row].error = e
            logprobs.append(None)
    return SampleResult(token_list, logprobs)


def _logprobs(lp: torch.Tensor, token: int, n: int) -> dict[int, float]:
    """The chosen token's logprob and the top n. lp: [V] log-softmax of the raw logits."""
    entry = {token: float(lp[token])}
    if n > 0:
        vals, ids = lp.topk(min(n, lp.shape[0]))
        for t, v in zip(ids.tolist(), vals.tolist()):
            entry.setdefault(t, v)
    return entry
