"""Start-up warm-up of the Triton kernels a busy server's first mixed step needs (the decode graphs warm the
decode-only variants when they capture)."""
from __future__ import annotations

import torch


def warm_up_mixed_step(runner) -> None:
    """Compile at start-up the kernel variants of a mixed step (decode rows beside a prompt chunk, token and row
    counts that are not multiples of 16: Triton specializes on those), rather than stalling that step. One step on
    scratch pools; Triton's disk cache makes later start-ups pay nothing. runner: a ModelRunner on CUDA."""
    from .runner import Batch

    bs = runner.block_size
    starts, lens = [19, 40, 7, 0], [1, 1, 1, 37]
    need = [-(-(a + n) // bs) for a, n in zip(starts, lens)]
    scratch = runner.scratch_pools(sum(need) + 1)
    first = [1 + sum(need[:i]) for i in range(len(need))]
    tables = [[list(range(f, f + k))] * len(runner.windows) for f, k in zip(first, need)]
    batch = Batch([[0] * n for n in lens], starts, tables, [None] * len(lens))
    with torch.inference_mode():
        ids, pos, meta, _ = runner.prepare(batch)
        hidden = runner.model.forward(ids, pos, meta, scratch)
        runner.model.compute_logits(hidden[-2:])
    torch.cuda.synchronize(runner.device)
    del scratch
