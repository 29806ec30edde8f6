"""Sampling: penalties -> temperature -> top-k / top-p / min-p -> seeded sample; raw logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import SamplingParams


@dataclass
class SampleRequest:
    """What the sampler needs of one sequence (kept free of engine types)."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    seed: int
    stop_ids: list[int]  # eos + stop_token_ids, masked while len(output) < min_tokens


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
        if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
            counts = torch.bincount(torch.tensor(r.output_ids, device=logits.device), minlength=vocab)[:vocab]
            logits[row] -= p.frequency_penalty * counts.float() + p.presence_penalty * (counts > 0).float()
        if len(r.output_ids) < p.min_tokens and r.stop_ids:
            logits[row, torch.tensor(r.stop_ids, device=logits.device)] = float("-inf")


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask excluded tokens with -inf. logits: [R, V] (already temperature-scaled); params: [R]."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    remove = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the token crossing p is kept)
    cum_before = probs.cumsum(dim=-1) - probs
    remove |= cum_before >= top_p[:, None]
    # min-p: drop tokens below min_p * max prob
    remove |= probs < (min_p[:, None] * probs[:, :1])
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _row_generator(seed: int, step: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash((seed, step)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def sample(logits: torch.Tensor, reqs: list[SampleRequest]) -> SampleResult:
    """logits: [R, V] fp32 raw model logits, one row per request."""
    want_lp = [r.params.logprobs for r in reqs]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(n is not None for n in want_lp) else None
    if any(r.params.needs_penalties or r.params.min_tokens for r in reqs):
        logits = logits.clone()
        apply_penalties(logits, reqs)
    tokens = logits.argmax(dim=-1)
    rand_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if rand_rows:
        idx = torch.tensor(rand_rows, device=logits.device)
        sub = logits[idx] / torch.tensor([reqs[i].params.temperature for i in rand_rows], device=logits.device)[:, None]
        params = [reqs[i].params for i in rand_rows]
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
            dev = logits.device
            sub = filter_logits(sub, torch.tensor([p.top_k for p in params], device=dev),
                                torch.tensor([p.top_p for p in params], device=dev),
                                torch.tensor([p.min_p for p in params], device=dev))
        probs = sub.softmax(dim=-1)
        # exponential race == multinomial draw; one generator per sequence and step -> batch-independent
        noise = torch.stack([torch.empty(probs.shape[1]).exponential_(
            generator=_row_generator(reqs[i].seed, len(reqs[i].output_ids))) for i in rand_rows]).to(probs.device)
        tokens[idx] = (probs / noise).argmax(dim=-1)
    token_list = tokens.tolist()
    logprobs: list[dict[int, float] | None] = []
    for row, n in enumerate(want_lp):
        if n is None:
            logprobs.append(None)
            continue
        lp = raw_logprobs[row]
        entry = {token_list[row]: float(lp[token_list[row]])}
        if n > 0:
            vals, ids = lp.topk(n)
            for t, v in zip(ids.tolist(), vals.tolist()):
                entry.setdefault(t, v)
        logprobs.append(entry)
    return SampleResult(token_list, logprobs)
