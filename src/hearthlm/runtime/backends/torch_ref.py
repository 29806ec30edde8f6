"""The torch reference backend: masked attention per sub-batch (decodes together, prefills together), any device.

Its metadata holds each KV group's sub-batches with their plans (layers/attention.cpu_plan), built with the step
so that every layer reads them as they are; and RoPE's cos/sin of the step, which the reference layers take."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...kernels.kv_quant import KVPool
from ...layers import attention as ref
from ...layers.attention import SubBatch, cpu_plan
from ...layers.rotary import Rotary
from ..step_inputs import StepInputs


@dataclass
class RefGroup:
    """Per KV group (layers sharing a window and a block table)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    window: int | None
    sub_batches: list[SubBatch] = field(default_factory=list)
    row_attention: object = None  # native backend: kernels/cpu_quant.RowAttention of the step, else None
    rows: tuple | None = None  # native backend: (key_slots, key_start, key_count), native.key_rows


@dataclass
class TorchMetadata:
    groups: list[RefGroup]
    layer_group: list[int]  # layer index -> group index
    positions: torch.Tensor  # [num_tokens] int64
    cos: torch.Tensor  # [num_tokens, 1, head_dim] (layers/rotary.Rotary.cos_sin)
    sin: torch.Tensor
    max_query_len: int = 0
    host: TorchMetadata | None = None  # --gpu-layers: the offloaded blocks' metadata (a device side's only)
    use_kernels: ClassVar[bool] = False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[KVPool, KVPool],
               layer: int, scale: float, softcap: float | None, kv_written: bool = False,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        gm = self.groups[self.layer_group[layer]]
        k_cache, v_cache = kv_cache
        if not kv_written:
            ref.write_kv(k, v, k_cache, v_cache, gm.slot_mapping)
        return ref.paged_attention_ref(q, k_cache, v_cache, gm.sub_batches, scale, softcap, sinks)


class TorchBackend:
    """Sub-batches and their plans for queries of `dtype` with num_heads / kv_heads heads; `bags`: the pools are
    plain float32 (decode attention reads values in place, layers/attention.uses_bags)."""

    name = "torch"
    supports_graphs = False

    def __init__(self, device: torch.device, windows: list[int | None], layer_group: list[int], num_heads: int,
                 kv_heads: int, dtype: torch.dtype, rotary: Rotary, bags: bool):
        self.device, self.windows, self.layer_group = torch.device(device), windows, layer_group
        self.num_heads, self.kv_heads, self.dtype, self.rotary, self.bags = num_heads, kv_heads, dtype, rotary, bags

    def build(self, step: StepInputs) -> TorchMetadata:
        dev = self.device
        positions = step.positions.to(dev)
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        groups = [RefGroup(slots.to(dev), window, self._sub_batches(step, tables, window))
                  for window, tables, slots in zip(self.windows, step.tables, step.slots)]
        meta = TorchMetadata(groups, self.layer_group, positions, cos, sin, step.max_query_len)
        self._plan(meta, step, range(len(groups)))
        return meta

    def _plan(self, meta: TorchMetadata, step: StepInputs, groups) -> None:
        for g in groups:
            for sb in meta.groups[g].sub_batches:
                sb.plan = cpu_plan(sb, step.num_tokens, self.dtype, self.num_heads, self.kv_heads, self.bags)

    def _sub_batches(self, step: StepInputs, tables: torch.Tensor, window: int | None) -> list[SubBatch]:
        decode = step.q_lens == 1
        out = []
        for part in (decode, ~decode):
            rows = part.nonzero().flatten()
            if len(rows):
                sb = sub_batch(step, tables, rows, window)
                out.append(SubBatch(*(t.to(self.device) for t in (sb.token_index, sb.valid_q, sb.key_slots,
                                                                  sb.mask))))
        return out


def sub_batch(step: StepInputs, tables: torch.Tensor, rows: torch.Tensor, window: int | None) -> SubBatch:
    """One masked attention batch of the sequences `rows`, on the host."""
    start, qlen = step.starts[rows], step.q_lens[rows]
    seq_len = start + qlen
    kstart = torch.zeros_like(start) if window is None else (start - window + 1).clamp(min=0)
    qmax, lmax = int(qlen.max()), int((seq_len - kstart).max())
    qi = torch.arange(qmax)[None, :]
    valid_q = qi < qlen[:, None]
    token_index = step.cu[rows][:, None] + torch.where(valid_q, qi, torch.zeros_like(qi))
    q_pos = start[:, None] + qi  # [B, Q]
    k_pos = kstart[:, None] + torch.arange(lmax)[None, :]  # [B, L]
    valid_k = k_pos < seq_len[:, None]
    k_pos_c = torch.where(valid_k, k_pos, torch.zeros_like(k_pos))
    bs = step.block_size
    key_slots = tables[rows[:, None].expand_as(k_pos_c), k_pos_c // bs].long() * bs + k_pos_c % bs
    mask = valid_k[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
    mask[:, :, 0] |= ~valid_q  # padded query rows attend somewhere (their output is discarded)
    return SubBatch(token_index, valid_q, key_slots, mask[:, None])
