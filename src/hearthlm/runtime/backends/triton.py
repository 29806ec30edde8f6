"""The Triton backend (CUDA): K/V written by reshape_and_cache (or by the fused RoPE kernel), decode rows through
the split-K decode kernel in longest-first order, prompt rows through the prefill kernel; --batch-invariant sends
every row through the prefill kernel with one fixed tiling. Off CUDA the kernels run their torch references.

Its metadata is device tensors only (block tables, lengths, the decode order), so decode steps can be captured
in CUDA graphs (runtime/cuda_graphs.py fills the same fields from its own buffers)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...kernels.kv_quant import KVPool
from ...kernels.paged_attention import decode_order_of
from ..step_inputs import StepInputs


@dataclass
class KernelGroup:
    """Per KV group (layers sharing a window and a block table)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    window: int | None
    block_tables: torch.Tensor  # [B, max_blocks] int32


@dataclass
class TritonMetadata:
    groups: list[KernelGroup]
    layer_group: list[int]  # layer index -> group index
    positions: torch.Tensor  # [num_tokens] int64
    seq_lens: torch.Tensor  # [B] int32, context incl. new tokens
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    max_query_len: int
    # mixed steps: the first num_decodes sequences decode one token each and take the decode kernel
    num_decodes: int = 0
    decode_order: torch.Tensor | None = None  # [decode rows] int32, longest context first (the decode kernel's order)
    # --batch-invariant: every row (decode, prefill chunk, cached prefix) takes the prefill kernel with one fixed
    # tiling, so a row's arithmetic depends only on its own position and context
    batch_invariant: bool = False
    # --gpu-layers: the same step's metadata on the offloaded blocks' device (torch/native backend)
    host: object = None
    # RoPE's inputs: the fused blocks' table (LlamaModel.cos_sin, [max_pos, head_dim] float32), and the step's
    # cos/sin [num_tokens, 1, head_dim] for reference blocks on this side (a family without fused blocks)
    cos_sin: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    use_kernels: ClassVar[bool] = True

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[KVPool, KVPool],
               layer: int, scale: float, softcap: float | None, kv_written: bool = False,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        from ...kernels import paged_decode_attention, paged_prefill_attention, reshape_and_cache

        gm = self.groups[self.layer_group[layer]]
        k_cache, v_cache = kv_cache
        if not kv_written:
            reshape_and_cache(k, v, k_cache, v_cache, gm.slot_mapping)
        if self.batch_invariant:
            return paged_prefill_attention(q, k_cache, v_cache, gm.block_tables, self.cu_seqlens_q, self.seq_lens,
                                           scale, softcap=softcap, window=gm.window, sinks=sinks,
                                           max_seqlen_q=self.max_query_len, invariant=True)
        if self.max_query_len == 1:
            return paged_decode_attention(q, k_cache, v_cache, gm.block_tables, self.seq_lens, scale,
                                          softcap=softcap, window=gm.window, seq_order=self.decode_order, sinks=sinks)
        d, out = self.num_decodes, None
        if d:  # the prefill kernel would pad each decode row to a whole query tile and never split its context
            out = torch.empty_like(q)
            paged_decode_attention(q[:d], k_cache, v_cache, gm.block_tables[:d], self.seq_lens[:d], scale,
                                   softcap=softcap, window=gm.window, out=out[:d], seq_order=self.decode_order,
                                   sinks=sinks)
        return paged_prefill_attention(q, k_cache, v_cache, gm.block_tables, self.cu_seqlens_q, self.seq_lens,
                                       scale, softcap=softcap, window=gm.window, sinks=sinks,
                                       max_seqlen_q=self.max_query_len, first_seq=d, out=out)


class TritonBackend:
    name = "triton"
    supports_graphs = True

    def __init__(self, device: torch.device, windows: list[int | None], layer_group: list[int],
                 batch_invariant: bool = False, cos_sin: torch.Tensor | None = None, rotary=None,
                 dtype: torch.dtype | None = None):
        """cos_sin: the fused blocks' RoPE table; rotary + dtype: the reference blocks' (when cos_sin is None)."""
        self.device, self.windows, self.layer_group = torch.device(device), windows, layer_group
        self.batch_invariant, self.cos_sin, self.rotary, self.dtype = batch_invariant, cos_sin, rotary, dtype

    def build(self, step: StepInputs) -> TritonMetadata:
        dev = self.device
        groups = [KernelGroup(slots.to(dev), window, tables.to(dev))
                  for window, tables, slots in zip(self.windows, step.tables, step.slots)]
        d = step.num_decodes
        order = torch.from_numpy(decode_order_of(step.seq_lens[:d].numpy())).to(dev) if d else None
        positions = step.positions.to(dev)
        meta = TritonMetadata(groups, self.layer_group, positions, step.seq_lens.to(dev, torch.int32),
                              step.cu.to(dev, torch.int32), step.max_query_len, d if step.max_query_len > 1 else 0,
                              order, self.batch_invariant, cos_sin=self.cos_sin)
        if self.cos_sin is None:
            meta.cos, meta.sin = self.rotary.cos_sin(positions, self.dtype)
        return meta
