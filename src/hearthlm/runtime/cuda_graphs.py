"""CUDA graphs for decode steps: one graph per batch size of a ladder, padded to the next size.

All graph inputs live in two device buffers (int64: ids, source rows, positions, slots per group; int32:
seq_lens, the decode kernel's program order, block tables per group) mirrored by two pairs of pinned host
buffers (used alternately, so filling step N+1's inputs never races the copy of step N's), so a step costs a
few async copies and one replay.
Padded rows write nowhere (slot -1) and attend to nothing (seq_len 0). A row whose source row is >= 0 takes
its input id from `prev_tokens` (the previous step's sampled tokens, still on the device). Each graph writes
its greedy argmax into `prev_tokens`; its logits are the head's raw output (model dtype) unless the model
softcaps them, and the runner upcasts them only when a row samples.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..kernels.paged_attention import decode_order_of
from .backends import KernelGroup, TritonBackend, TritonMetadata
from .step_inputs import BlockTables

log = logging.getLogger("hearthlm")


def batch_ladder(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [s for s in sizes if s < max_bs] + [max_bs]


class DecodeGraphs:
    def __init__(self, model, kv_caches, backend: TritonBackend, max_bs: int, tables: BlockTables,
                 device: torch.device, prev_tokens: torch.Tensor):
        """backend: the runner's (the graphs fill its metadata type from their buffers); tables: the runner's
        block tables (built there and here alike, cached per sequence)."""
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.sizes = batch_ladder(max_bs)
        self.tables = tables
        self.max_blocks, self.block_size = tables.max_blocks, tables.block_size
        self.windows, self.layer_group = backend.windows, backend.layer_group
        n, g = self.sizes[-1], len(self.windows)
        self.n = n
        self.prev_tokens = prev_tokens
        self.dev_i64 = torch.zeros((3 + g) * n, dtype=torch.long, device=device)
        self.dev_i32 = torch.zeros(2 * n + g * n * self.max_blocks, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)  # one query per sequence
        self.host = [(torch.zeros_like(self.dev_i64, device="cpu").pin_memory(),
                      torch.zeros_like(self.dev_i32, device="cpu").pin_memory()) for _ in range(2)]
        self.flip = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def _views(self, buf64: torch.Tensor, buf32: torch.Tensor):
        n, mb = self.n, self.max_blocks
        ids, src, pos = buf64[:n], buf64[n:2 * n], buf64[2 * n:3 * n]
        slots = [buf64[(3 + g) * n:(4 + g) * n] for g in range(len(self.windows))]
        seq_lens, order = buf32[:n], buf32[n:2 * n]
        tables = [buf32[2 * n + g * n * mb:2 * n + (g + 1) * n * mb].view(n, mb) for g in range(len(self.windows))]
        return ids, src, pos, slots, seq_lens, order, tables

    def _forward(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, src, pos, slots, seq_lens, order, tables = self._views(self.dev_i64, self.dev_i32)
        groups = [KernelGroup(s[:bs], w, t[:bs]) for s, t, w in zip(slots, tables, self.windows)]
        b = self.backend
        meta = TritonMetadata(groups, self.layer_group, pos[:bs], seq_lens[:bs], self.cu_seqlens_q[:bs + 1], 1,
                              decode_order=order[:bs], batch_invariant=b.batch_invariant, cos_sin=b.cos_sin)
        if b.cos_sin is None:  # reference blocks: RoPE's cos/sin from the positions, inside the graph
            meta.cos, meta.sin = b.rotary.cos_sin(pos[:bs], b.dtype)
        rows = src[:bs]
        inputs = torch.where(rows >= 0, self.prev_tokens[rows.clamp(min=0)], ids[:bs])
        hidden = self.model.forward(inputs, pos[:bs], meta, self.kv_caches)
        # without a final softcap the argmax of the head's raw output is the argmax of its fp32 copy (the upcast is
        # exact): skip that copy; the runner makes it only when a row samples
        cap = self.model.cfg.final_logit_softcapping
        logits = self.model.compute_logits(hidden) if cap else self.model.lm_head(hidden)
        tokens = self.prev_tokens[:bs]
        torch.argmax(logits, dim=-1, out=tokens)
        return logits, tokens

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        _, src, _, slots, _, order, _ = self._views(self.dev_i64, self.dev_i32)
        src.fill_(-1)
        for s in slots:
            s.fill_(-1)
        order.copy_(torch.arange(self.n, dtype=torch.int32))
        for bs in reversed(self.sizes):
            self._forward(bs)  # warm-up: compiles Triton kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits, tokens = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = (graph, logits, tokens)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s in %.2fs", self.sizes, time.perf_counter() - t0)

    def can_run(self, num_seqs: int, max_blocks_needed: int) -> bool:
        return num_seqs <= self.sizes[-1] and max_blocks_needed <= self.max_blocks

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[list[int]]],
            keys: list, prev_rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for len(token_ids) sequences -> (logits [B, vocab], greedy tokens [B]) on device."""
        b = len(token_ids)
        bs = next(s for s in self.sizes if s >= b)
        n, mb = self.n, self.max_blocks
        host_i64, host_i32 = self.host[self.flip]
        self.flip ^= 1
        ids, src, pos, slots, seq_lens, order, tables = self._views(host_i64, host_i32)
        ids[:b] = torch.tensor(token_ids)
        src[:bs] = -1
        if prev_rows is not None:
            src[:b] = torch.tensor(prev_rows)
        p = np.asarray(positions, dtype=np.int64)
        pos[:b] = torch.from_numpy(p)
        seq_lens[:b] = torch.from_numpy(p + 1)
        seq_lens[b:bs] = 0
        order[:b] = torch.from_numpy(decode_order_of(p))  # padding rows (length 0) keep their places after b
        order[b:bs] = torch.arange(b, bs, dtype=torch.int32)
        rows = np.arange(b)
        for g, table in enumerate(self.tables.tables(block_tables, keys, width=mb)):
            tables[g][:b] = torch.from_numpy(table)
            slots[g][:b] = torch.from_numpy(self.tables.slots(table, rows, p))
            slots[g][b:bs] = -1
        self.dev_i64.copy_(host_i64, non_blocking=True)
        self.dev_i32[:bs].copy_(host_i32[:bs], non_blocking=True)
        self.dev_i32[n:n + bs].copy_(host_i32[n:n + bs], non_blocking=True)
        for g in range(len(self.windows)):
            lo = 2 * n + g * n * mb
            self.dev_i32[lo:lo + bs * mb].copy_(host_i32[lo:lo + bs * mb], non_blocking=True)
        graph, logits, tokens = self.graphs[bs]
        graph.replay()
        return logits[:b], tokens[:b]
