"""The native CPU backend: RoPE, K/V writes and attention of every row in one call of the native kernel per layer
(kernels/cpu_quant.RowAttention), prefill and decode alike (the same per-row arithmetic, so a row's result does
not depend on the batch, the chunking or the prefix cache), over plain float32 pools.

Its metadata is the torch reference's plus each KV group's rows (key_rows: every token's keys as one run of slots)
and RowAttention, prepared with the step. Layers whose projections are not native (NativeLlamaLayer's condition)
read the reference sub-batches, which are built, with their plans, only for groups such a layer reads."""
from __future__ import annotations

import torch

import numpy as np

from ...layers.rotary import Rotary
from ..step_inputs import StepInputs
from .torch_ref import RefGroup, TorchBackend, TorchMetadata


class NativeBackend(TorchBackend):
    name = "native"

    def __init__(self, device: torch.device, windows: list[int | None], layer_group: list[int], num_heads: int,
                 kv_heads: int, head_dim: int, rotary: Rotary, scale: float, softcap: float | None, lib,
                 reference_groups: set[int]):
        """lib: the kernel build the layers' weights run (NativeWeight.lib); reference_groups: the KV groups with a
        layer that attends through the torch reference."""
        super().__init__(device, windows, layer_group, num_heads, kv_heads, torch.float32, rotary, bags=True)
        self.head_dim, self.scale, self.softcap, self.lib = head_dim, scale, softcap, lib
        self.reference_groups = reference_groups

    def build(self, step: StepInputs) -> TorchMetadata:
        from ...kernels.cpu_quant import RowAttention

        dev = self.device
        positions = step.positions.to(dev)
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        meta = TorchMetadata([], self.layer_group, positions, cos, sin, step.max_query_len)
        planned = [g for g in range(len(self.windows)) if g in self.reference_groups]
        for g, (window, tables, slots) in enumerate(zip(self.windows, step.tables, step.slots)):
            gm = RefGroup(slots.to(dev), window, self._sub_batches(step, tables, window) if g in planned else [])
            gm.rows = key_rows(step, tables, window)
            gm.row_attention = RowAttention(cos, sin, gm.slot_mapping, *gm.rows, self.num_heads, self.kv_heads,
                                            self.head_dim, self.scale, self.softcap, lib=self.lib)
            meta.groups.append(gm)
        self._plan(meta, step, planned)
        return meta


def key_rows(step: StepInputs, table: torch.Tensor, window: int | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every token's keys as RowAttention takes them: (key_slots flat, key_start [T], key_count [T]), int64. A
    sequence's keys from the first any of its tokens sees to its last, in position order, once; token t at position
    p attends positions max(0, p - window + 1) .. p (all up to p without a window), one run of them."""
    q, starts = step.q_lens.numpy(), step.starts.numpy()
    b = len(q)
    kstart = np.zeros_like(starts) if window is None else np.maximum(starts - window + 1, 0)
    length = starts + q - kstart
    off = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(length, out=off[1:])
    seq = np.repeat(np.arange(b), length)
    pos = kstart[seq] + np.arange(int(off[-1])) - off[:-1][seq]
    bs = step.block_size
    key_slots = table.numpy()[seq, pos // bs].astype(np.int64) * bs + pos % bs
    tok_seq = np.repeat(np.arange(b), q)
    tok_pos = step.positions.numpy()
    first = np.zeros_like(tok_pos) if window is None else np.maximum(tok_pos - window + 1, 0)
    key_start = off[:-1][tok_seq] + first - kstart[tok_seq]
    return torch.from_numpy(key_slots), torch.from_numpy(key_start), torch.from_numpy(tok_pos - first + 1)
