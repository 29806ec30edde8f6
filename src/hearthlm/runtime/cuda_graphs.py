"""CUDA graphs for decode steps: one graph per batch size of a ladder, padded to the next size.

Static buffers hold the step's inputs; padded rows write nowhere (slot -1) and attend to nothing
(seq_len 0). Graphs share one memory pool; capture runs once at start-up.
"""
from __future__ import annotations

import logging

import torch

from ..layers.attention import AttentionMetadata, GroupMeta

log = logging.getLogger("hearthlm")


def batch_ladder(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [s for s in sizes if s < max_bs] + [max_bs]


class DecodeGraphs:
    def __init__(self, model, kv_caches, windows: list[int | None], layer_group: list[int], max_bs: int,
                 max_blocks: int, device: torch.device):
        self.model, self.kv_caches = model, kv_caches
        self.sizes = batch_ladder(max_bs)
        self.max_blocks = max_blocks
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.slots = [torch.full((n,), -1, dtype=torch.long, device=device) for _ in windows]
        self.tables = [torch.zeros(n, max_blocks, dtype=torch.int32, device=device) for _ in windows]
        self.windows, self.layer_group = windows, layer_group
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        groups = [GroupMeta(slot_mapping=s[:bs], window=w, block_tables=t[:bs])
                  for s, t, w in zip(self.slots, self.tables, self.windows)]
        return AttentionMetadata(groups=groups, layer_group=self.layer_group, seq_lens=self.seq_lens[:bs],
                                 max_query_len=1, use_kernels=True)

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model.forward(self.input_ids[:bs], self.positions[:bs], self._meta(bs), self.kv_caches)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        for bs in reversed(self.sizes):
            self._forward(bs)  # warm-up: compiles Triton kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, num_seqs: int, max_blocks_needed: int) -> bool:
        return num_seqs <= self.sizes[-1] and max_blocks_needed <= self.max_blocks

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
            slots: list[torch.Tensor], tables: list[torch.Tensor]) -> torch.Tensor:
        """Inputs are CPU tensors for the real rows; returns logits [num_seqs, vocab]."""
        bs_real = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= bs_real)
        self.input_ids[:bs_real].copy_(input_ids, non_blocking=True)
        self.positions[:bs_real].copy_(positions, non_blocking=True)
        self.seq_lens[:bs_real].copy_(seq_lens, non_blocking=True)
        self.seq_lens[bs_real:bs].zero_()
        for g in range(len(self.slots)):
            self.slots[g][:bs_real].copy_(slots[g], non_blocking=True)
            self.slots[g][bs_real:bs].fill_(-1)
            width = tables[g].shape[1]
            self.tables[g][:bs_real, :width].copy_(tables[g], non_blocking=True)
        graph, out = self.graphs[bs]
        graph.replay()
        return out[:bs_real]
