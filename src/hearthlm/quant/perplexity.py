"""Sliding-window perplexity through the engine's own runner (fresh KV blocks per window, no prefix reuse).

Default (`stride`, like HF's "perplexity of fixed-length models"): windows of `ctx` tokens every `stride`
tokens; the first window scores all its tokens, each later one only the tokens past the previous window's end
(with stride = ctx/2: its second half). `llama_compat=True` follows llama-perplexity instead: disjoint chunks of
`ctx` tokens, BOS written over each chunk's first token when the tokenizer adds one, the second half scored.
The uncertainty is llama-perplexity's: PPL * standard error of the mean per-token NLL.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import InvalidRequestError
from ..runtime.runner import Batch


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens in the text
    tokens_scored: int
    tokens_evaluated: int  # tokens run through the model
    windows: int
    ctx: int
    stride: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_evaluated / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        return dict(asdict(self), tokens_per_s=self.tokens_per_s)


def plan_windows(n_tokens: int, ctx: int, stride: int, llama_compat: bool = False) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: tokens [begin, end) are evaluated, targets [first_scored, end)
    scored (each predicted from the logits one position earlier)."""
    if llama_compat:
        return [(b, b + ctx, b + ctx // 2 + 1) for b in range(0, n_tokens - ctx + 1, ctx)]
    out, prev_end = [], 0
    for begin in range(0, max(1, n_tokens - 1), stride):
        end = min(begin + ctx, n_tokens)
        if max(prev_end, begin + 1) < end:
            out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def window_logits(llm, windows: list[list[int]]) -> list[torch.Tensor]:
    """Logits [len(w), vocab] of every position of each token window, each in fresh KV blocks (freed after)."""
    eng = llm.engine
    bs = eng.kv.block_size
    tables = [[[g.pool.allocate() for _ in range(-(-len(w) // bs))] for g in eng.kv.groups] for w in windows]
    try:
        logits = eng.runner.logits_for(Batch(windows, [0] * len(windows), tables, [None] * len(windows)))
    finally:
        for seq in tables:
            for g, table in zip(eng.kv.groups, seq):
                for block in table:
                    g.pool.release(block)
    return list(logits.split([len(w) for w in windows]))


def perplexity(llm, ids: list[int], ctx: int, stride: int | None = None, batch: int = 1,
               llama_compat: bool = False, max_windows: int | None = None, bos_id: int | None = None,
               progress: bool | None = None) -> PerplexityResult:
    """Perplexity of token ids under `llm` (an LLM; its KV pool must hold `batch` windows of `ctx` tokens).
    progress: a bar on stderr per window with the running PPL (hearthlm.progress: None = on a terminal, after a
    second)."""
    from ..progress import bar

    eng = llm.engine
    max_len = eng.model_config.max_position_embeddings
    stride = max(1, ctx // 2) if stride is None else stride
    if ctx < 2 or ctx > max_len:
        raise InvalidRequestError(f"--ctx {ctx} must be between 2 and the model's context {max_len}", param="ctx")
    if not 1 <= stride <= ctx:
        raise InvalidRequestError(f"--stride {stride} must be between 1 and --ctx {ctx}", param="stride")
    if len(ids) < (2 * ctx if llama_compat else 2):
        need = f"{2 * ctx} (2 x ctx, like llama-perplexity)" if llama_compat else "2"
        raise InvalidRequestError(f"the text has {len(ids)} tokens but at least {need} are needed: use a longer "
                                  "text or a smaller --ctx", param="file")
    wins = plan_windows(len(ids), ctx, stride, llama_compat)[:max_windows]
    nll_sum = nll2_sum = 0.0
    scored = evaluated = 0
    start = time.perf_counter()
    ticks = bar(len(wins), "perplexity", "window", progress)
    try:
        for i in range(0, len(wins), batch):
            group = wins[i:i + batch]
            toks = [list(ids[b:e]) for b, e, _ in group]
            if llama_compat and bos_id is not None:
                for t in toks:
                    t[0] = bos_id
            logits = window_logits(llm, toks)
            for (b, e, first), lg in zip(group, logits):
                lp = torch.log_softmax(lg[first - b - 1:e - b - 1].float(), dim=-1)
                nll = -lp.gather(1, torch.tensor(ids[first:e])[:, None].to(lp.device))[:, 0].double()
                nll_sum += float(nll.sum())
                nll2_sum += float((nll * nll).sum())
                scored += e - first
                evaluated += e - b
            ticks.update(len(group))
            ticks.set_postfix_str(f"PPL {math.exp(nll_sum / scored):.4f}")
    finally:
        ticks.close()
    seconds = time.perf_counter() - start
    mean = nll_sum / scored
    var = max(0.0, nll2_sum / scored - mean * mean)
    err = math.sqrt(var / (scored - 1)) if scored > 1 else float("nan")
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * err, mean, len(ids), scored, evaluated, len(wins), ctx, stride, seconds)


def perplexity_llm(model: str, ctx: int, batch: int = 1, dtype: str = "float32", device: str = "cpu",
                   progress: bool | None = None, weights: str | None = None):
    """An LLM for `perplexity`: KV pool of exactly `batch` windows of `ctx` tokens, no prefix caching.
    progress: the load's bar (load_model); weights: EngineConfig.weights (None: auto)."""
    from ..llm import LLM
    from ..loader import load_model

    loaded = load_model(model, dtype, device, weights=weights, progress=progress)
    max_len = loaded.config.max_position_embeddings
    if ctx > max_len:
        raise InvalidRequestError(f"--ctx {ctx} is larger than the model's context ({max_len} tokens): "
                                  f"use --ctx {max_len} or less", param="ctx")
    blocks = batch * -(-ctx // 16) + 1
    return LLM(loaded=loaded, dtype=dtype, device=device, max_model_len=ctx, max_num_seqs=batch,
               max_num_batched_tokens=batch * ctx, num_kv_blocks=blocks, enable_prefix_caching=False,
               cuda_graphs=False)
