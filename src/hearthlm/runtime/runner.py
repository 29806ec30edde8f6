"""Model runner: KV pools, batch tensors, forward, logits for the rows that sample.

It knows nothing about requests: it receives a Batch (token ids, positions, block tables,
sampling requests) and returns sampled tokens.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from ..config import CacheConfig, ModelConfig, SchedulerConfig
from ..layers.attention import AttentionMetadata, GroupMeta, SubBatch
from ..models.llama import LlamaModel
from .sampler import SampleRequest, SampleResult, sample

log = logging.getLogger("hearthlm")


@dataclass
class Batch:
    token_ids: list[list[int]]  # new tokens of each sequence this step
    start_positions: list[int]  # position of each sequence's first new token (= tokens already cached)
    block_tables: list[list[list[int]]]  # [seq][group] -> block ids
    sample: list[SampleRequest | None]  # None: a prefill chunk that does not end the prompt
    seq_keys: list = field(default_factory=list)  # stable per sequence until its blocks are reassigned


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block of one layer."""
    return 2 * block_size * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from ..plan.memory import system_memory_bytes

    return system_memory_bytes()


def plan_num_blocks(cfg: ModelConfig, cache: CacheConfig, sched: SchedulerConfig, dtype: torch.dtype,
                    device: torch.device, windows: list[int | None]) -> list[int]:
    """Blocks per KV group (groups ordered as `windows`) within the memory budget."""
    bs = cache.block_size
    if cache.num_blocks is not None:
        return [cache.num_blocks] * len(windows)
    per_block = kv_bytes_per_block(cfg, bs, dtype)
    layers = {w: sum(1 for lw in cfg.layer_windows if lw == w) for w in windows}
    budget = cache.kv_cache_memory
    if budget is None:
        if device.type == "cuda":
            budget = int(available_memory_bytes(device) * cache.memory_fraction)
        else:  # CPU: a quarter of free RAM, at most 4 GiB (KV beyond that is rarely usable at CPU speed)
            budget = min(int(available_memory_bytes(device) * 0.25), 4 << 30)
    # never more than max_num_seqs sequences of max_model_len tokens (plus the null block) can use
    max_useful = sched.max_num_seqs * (-(-sched.max_model_len // bs) + 1) + 1
    out = {}
    for w in windows:
        if w is not None:
            out[w] = min(max_useful, sched.max_num_seqs * (-(-w // bs) + 2)
                         + -(-sched.max_num_batched_tokens // bs) + 1)
    spent = sum(out[w] * layers[w] * per_block for w in out)
    full_layers = layers.get(None, 0)
    if full_layers:
        out[None] = min(max_useful, max(2, (budget - spent) // (per_block * full_layers)))
    elif windows:  # only sliding layers: give them the whole budget
        w = windows[0]
        out[w] = min(max_useful, max(out[w], budget // (per_block * layers[w])))
    return [int(out[w]) for w in windows]


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: CacheConfig, sched: SchedulerConfig, windows: list[int | None],
                 device: torch.device):
        self.model = model
        self.cfg = model.cfg
        self.device = device
        self.block_size = cache.block_size
        self.windows = windows
        self.dtype = model.dtype
        self.num_blocks = plan_num_blocks(self.cfg, cache, sched, self.dtype, device, windows)
        self.layer_group = [windows.index(w) for w in self.cfg.layer_windows]
        self.kv_caches = [(self._new_cache(self.num_blocks[g]), self._new_cache(self.num_blocks[g]))
                          for g in self.layer_group]
        self.use_kernels = device.type == "cuda" and os.environ.get("HEARTH_DISABLE_KERNELS") != "1"
        self.graphs = None
        if self.use_kernels and cache.cuda_graphs:
            from .cuda_graphs import DecodeGraphs

            max_blocks = -(-sched.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(model, self.kv_caches, windows, self.layer_group,
                                       min(sched.max_num_seqs, 256), max_blocks, self.block_size, device)
            self.graphs.capture()

    def _new_cache(self, num_blocks: int) -> torch.Tensor:
        # [num_blocks, block_size, kv_heads, head_dim]. On CPU pages are touched only as blocks get used
        # (the reference path never reads unwritten slots except the zeroed null block 0); Triton kernels
        # load whole tiles, so GPU pools start zeroed.
        shape = (num_blocks, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        if self.device.type == "cuda":
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        cache[0].zero_()
        return cache

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    # ---- batch preparation ----
    def _slots(self, tables: torch.Tensor, seq_rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        bs = self.block_size
        return tables[seq_rows, positions // bs].long() * bs + positions % bs

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        dev = self.device
        q_lens = [len(t) for t in batch.token_ids]
        starts = torch.tensor(batch.start_positions, dtype=torch.long)
        q_lens_t = torch.tensor(q_lens, dtype=torch.long)
        seq_lens = starts + q_lens_t
        num_seqs = len(q_lens)
        seq_rows = torch.repeat_interleave(torch.arange(num_seqs), q_lens_t)
        cu = torch.zeros(num_seqs + 1, dtype=torch.long)
        cu[1:] = q_lens_t.cumsum(0)
        offsets = torch.arange(int(cu[-1])) - cu[:-1][seq_rows]
        positions = starts[seq_rows] + offsets
        input_ids = torch.tensor([t for ids in batch.token_ids for t in ids], dtype=torch.long)
        groups = []
        for g, window in enumerate(self.windows):
            width = max(len(bt[g]) for bt in batch.block_tables)
            tables = torch.zeros(num_seqs, max(1, width), dtype=torch.int32)
            for i, bt in enumerate(batch.block_tables):
                tables[i, :len(bt[g])] = torch.tensor(bt[g], dtype=torch.int32)
            gm = GroupMeta(slot_mapping=self._slots(tables, seq_rows, positions).to(dev), window=window)
            if self.use_kernels:
                gm.block_tables = tables.to(dev)
            else:
                decode = q_lens_t == 1
                for part in (decode, ~decode):
                    rows = part.nonzero().flatten()
                    if len(rows):
                        gm.sub_batches.append(self._sub_batch(tables, rows, starts, q_lens_t, cu, window))
            groups.append(gm)
        meta = AttentionMetadata(groups=groups, layer_group=self.layer_group, max_query_len=max(q_lens),
                                 use_kernels=self.use_kernels)
        if self.use_kernels:
            meta.seq_lens = seq_lens.to(dev, torch.int32)
            meta.cu_seqlens_q = cu.to(dev, torch.int32)
        sample_rows = torch.tensor([int(cu[i + 1]) - 1 for i, s in enumerate(batch.sample) if s is not None],
                                   dtype=torch.long)
        return input_ids.to(dev), positions.to(dev), meta, sample_rows.to(dev)

    def _sub_batch(self, tables: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor, q_lens: torch.Tensor,
                   cu: torch.Tensor, window: int | None) -> SubBatch:
        start, qlen = starts[rows], q_lens[rows]
        seq_len = start + qlen
        kstart = torch.zeros_like(start) if window is None else (start - window + 1).clamp(min=0)
        qmax, lmax = int(qlen.max()), int((seq_len - kstart).max())
        qi = torch.arange(qmax)[None, :]
        valid_q = qi < qlen[:, None]
        token_index = cu[rows][:, None] + torch.where(valid_q, qi, torch.zeros_like(qi))
        q_pos = start[:, None] + qi  # [B, Q]
        k_pos = kstart[:, None] + torch.arange(lmax)[None, :]  # [B, L]
        valid_k = k_pos < seq_len[:, None]
        k_pos_c = torch.where(valid_k, k_pos, torch.zeros_like(k_pos))
        key_slots = self._slots(tables, rows[:, None].expand_as(k_pos_c), k_pos_c)
        mask = valid_k[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
        if window is not None:
            mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
        mask[:, :, 0] |= ~valid_q  # padded query rows attend somewhere (their output is discarded)
        dev = self.device
        return SubBatch(token_index.to(dev), valid_q.to(dev), key_slots.to(dev), mask[:, None].to(dev))

    # ---- execution ----
    def _graph_decode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits, greedy tokens) via a captured CUDA graph when every sequence decodes one token."""
        if self.graphs is None or any(len(t) != 1 for t in batch.token_ids):
            return None
        width = max(len(bt[g]) for bt in batch.block_tables for g in range(len(self.windows)))
        if not self.graphs.can_run(len(batch.token_ids), width) or len(batch.seq_keys) != len(batch.token_ids):
            return None
        return self.graphs.run([t[0] for t in batch.token_ids], batch.start_positions, batch.block_tables,
                               batch.seq_keys)

    @torch.inference_mode()
    def execute(self, batch: Batch) -> SampleResult:
        reqs = [s for s in batch.sample if s is not None]
        graph_out = self._graph_decode(batch)
        if graph_out is not None:
            logits, greedy = graph_out
            if all(r.params.greedy and r.params.logprobs is None and not r.params.needs_penalties
                   and not r.params.min_tokens for r in reqs):
                return SampleResult(greedy.tolist(), [None] * len(reqs))
        else:
            input_ids, positions, meta, sample_rows = self.prepare(batch)
            hidden = self.model.forward(input_ids, positions, meta, self.kv_caches)
            if not reqs:
                return SampleResult([], [])
            logits = self.model.compute_logits(hidden[sample_rows])
        return sample(logits, reqs)

    @torch.inference_mode()
    def logits_for(self, batch: Batch) -> torch.Tensor:
        """Logits of every token of the batch (used by perplexity and tests)."""
        input_ids, positions, meta, _ = self.prepare(batch)
        return self.model.compute_logits(self.model.forward(input_ids, positions, meta, self.kv_caches))
