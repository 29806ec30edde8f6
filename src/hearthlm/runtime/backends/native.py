"""The native CPU backend: RoPE, K/V writes and attention of every row in one call of the native kernel per layer
(kernels/cpu_quant.RowAttention), prefill and decode alike (the same per-row arithmetic, so a row's result does
not depend on the batch, the chunking or the prefix cache), over plain float32 pools.

Its metadata is the torch reference's plus each KV group's RowAttention, prepared with the step. Layers whose
projections are not native (NativeLlamaLayer's condition) read the reference sub-batches, whose plans are built
only for groups such a layer reads."""
from __future__ import annotations

import torch

from ...layers.attention import native_rows
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
        planned = []
        for g, (window, tables, slots) in enumerate(zip(self.windows, step.tables, step.slots)):
            gm = RefGroup(slots.to(dev), window, self._sub_batches(step, tables, window))
            rows = native_rows(gm.sub_batches, step.num_tokens)
            if rows is not None:
                gm.row_attention = RowAttention(cos, sin, gm.slot_mapping, *rows, self.num_heads, self.kv_heads,
                                                self.head_dim, self.scale, self.softcap, lib=self.lib)
            if rows is None or g in self.reference_groups:
                planned.append(g)
            meta.groups.append(gm)
        self._plan(meta, step, planned)
        return meta
