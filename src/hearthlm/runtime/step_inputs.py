"""A step's host-side inputs, shared by every attention backend: positions, lengths, and the block tables and slot
mappings, which are built here and nowhere else (the runner's steps and the CUDA graphs' decode steps alike)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class BlockTables:
    """Block tables as int32 rows, cached per sequence key and extended with the blocks each step adds, so that a
    decode step copies only new block ids. Entries a sliding window released stay stale in a cached row: they are
    valid block ids, never read (the window masks them)."""

    def __init__(self, num_groups: int, block_size: int, max_blocks: int, max_keys: int = 1024):
        self.num_groups, self.block_size, self.max_blocks, self.max_keys = num_groups, block_size, max_blocks, max_keys
        self.rows: dict[object, tuple[list[np.ndarray], list[int]]] = {}

    def tables(self, block_tables: list[list[list[int]]], keys: list | None = None,
               width: int | None = None) -> list[np.ndarray]:
        """[group] -> [B, width] int32 (width: the longest table of the group, at least 1), zero-padded. keys:
        one per sequence, stable until its blocks are reassigned (Batch.seq_keys): rows come from the cache."""
        groups = range(self.num_groups)
        widths = [width or max(1, max(len(bt[g]) for bt in block_tables)) for g in groups]
        if keys is None or len(keys) != len(block_tables) or max(widths) > self.max_blocks:
            out = [np.zeros((len(block_tables), w), dtype=np.int32) for w in widths]
            for i, bt in enumerate(block_tables):
                for g in groups:
                    out[g][i, :len(bt[g])] = bt[g]
            return out
        if len(self.rows) > self.max_keys:
            live = set(keys)
            self.rows = {k: v for k, v in self.rows.items() if k in live}
        per_group: list[list[np.ndarray]] = [[] for _ in groups]
        for key, bt in zip(keys, block_tables):
            entry = self.rows.get(key)
            if entry is None:
                entry = self.rows[key] = ([np.zeros(self.max_blocks, dtype=np.int32) for _ in groups],
                                          [0] * self.num_groups)
            arrs, filled = entry
            for g in groups:
                table = bt[g]
                if len(table) > filled[g]:
                    arrs[g][filled[g]:len(table)] = table[filled[g]:]
                    filled[g] = len(table)
                per_group[g].append(arrs[g])
        return [np.ascontiguousarray(np.stack(rows)[:, :w]) for rows, w in zip(per_group, widths)]

    def slots(self, table: np.ndarray, seq_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Cache slot of each token: table [B, W], seq_rows / positions [T] -> [T] int64."""
        bs = self.block_size
        return table[seq_rows, positions // bs].astype(np.int64) * bs + positions % bs


@dataclass
class StepInputs:
    """One step on the host (int64 unless noted): what every backend builds its metadata from."""

    q_lens: torch.Tensor  # [B] new tokens per sequence
    starts: torch.Tensor  # [B] tokens already cached per sequence
    seq_lens: torch.Tensor  # [B] context incl. the new tokens
    cu: torch.Tensor  # [B + 1] cumulative q_lens
    positions: torch.Tensor  # [T]
    tables: list[torch.Tensor]  # [group] -> [B, W] int32 block tables
    slots: list[torch.Tensor]  # [group] -> [T] slot of each new token
    max_query_len: int
    # the leading sequences with one new token each (the scheduler puts running sequences first): a mixed step's
    # decode rows; every sequence when max_query_len == 1
    num_decodes: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]


def step_inputs(tables: BlockTables, token_ids: list[list[int]], start_positions: list[int],
                block_tables: list[list[list[int]]], keys: list | None = None) -> StepInputs:
    q_lens = [len(t) for t in token_ids]
    num_decodes = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
    q = np.asarray(q_lens, dtype=np.int64)
    starts = np.asarray(start_positions, dtype=np.int64)
    cu = np.zeros(len(q_lens) + 1, dtype=np.int64)
    np.cumsum(q, out=cu[1:])
    seq_rows = np.repeat(np.arange(len(q_lens)), q)
    positions = starts[seq_rows] + np.arange(int(cu[-1])) - cu[:-1][seq_rows]
    tabs = tables.tables(block_tables, keys)
    slots = [torch.from_numpy(tables.slots(t, seq_rows, positions)) for t in tabs]
    return StepInputs(torch.from_numpy(q), torch.from_numpy(starts), torch.from_numpy(starts + q), torch.from_numpy(cu),
                      torch.from_numpy(positions), [torch.from_numpy(t) for t in tabs], slots, max(q_lens), num_decodes,
                      tables.block_size)
