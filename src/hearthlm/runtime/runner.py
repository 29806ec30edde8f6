"""Model runner: inputs -> attention metadata -> model -> sampler.

It knows nothing about requests: it receives a Batch (token ids, positions, block tables, sampling requests) and
returns sampled tokens. Pool sizing lives in kv_pools.py, the attention backends in backends/, the step's host
inputs (block tables, slots) in step_inputs.py, start-up warm-up in warmup.py and cuda_graphs.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import CacheConfig, SchedulerConfig
from ..kernels.kv_quant import KVPool, new_pool, pool_nbytes
from ..models.llama import LlamaModel
from .backends import AttentionMetadata, make_backend
from .kv_pools import kv_bytes_per_block, plan_num_blocks, profile_step_bytes  # noqa: F401 (re-exported)
from .sampler import SampleRequest, SampleResult, needs_host_sampling, sample, sample_tokens
from .step_inputs import BlockTables, step_inputs


@dataclass
class Batch:
    token_ids: list[list[int]]  # new tokens of each sequence this step
    start_positions: list[int]  # position of each sequence's first new token (= tokens already cached)
    block_tables: list[list[list[int]]]  # [seq][group] -> block ids
    sample: list[SampleRequest | None]  # None: a prefill chunk that does not end the prompt
    seq_keys: list = field(default_factory=list)  # stable per sequence until its blocks are reassigned
    # per sequence: row of the previous step's sampled tokens that is this decode's input (its id is still on
    # the device), or -1 when token_ids holds it
    prev_rows: list[int] = field(default_factory=list)
    # per sequence (or empty: none): which rows of the final hidden states the step returns (pooling requests)
    hidden: list[int] = field(default_factory=list)  # HIDDEN_NONE | HIDDEN_LAST | HIDDEN_ALL


HIDDEN_NONE, HIDDEN_LAST, HIDDEN_ALL = 0, 1, 2


class StepHandle:
    """The sampled tokens of a launched step; result() waits for the device only when called."""

    def __init__(self, result: SampleResult | None = None, host: torch.Tensor | None = None, event=None,
                 hidden: list[torch.Tensor | None] | None = None):
        self._result, self._host, self._event = result, host, event
        self.hidden = hidden  # per sequence: its requested hidden rows (float32, host), else None

    def result(self) -> SampleResult:
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            tokens = self._host.tolist()
            self._result = SampleResult(tokens, [None] * len(tokens))
        return self._result


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: CacheConfig, sched: SchedulerConfig, windows: list[int | None],
                 device: torch.device, kernels: str = "auto"):
        """kernels: EngineConfig.kernels; "auto" runs the device side on the Triton backend when it is CUDA."""
        self.model = model
        self.cfg = model.cfg
        self.device = device
        self.block_size = cache.block_size
        self.windows = windows
        self.dtype = model.dtype
        self.kv_cache_dtype = cache.cache_dtype
        # --gpu-layers: each block's KV pool lives on that block's device; the block ids are shared by all layers,
        # so a group has one block count: the smaller of what each device's budget allows for its layers
        place = model.placement
        self.host = place.host if place.offloaded else None  # offloaded blocks' device (meta.host lives there)
        self.layer_devices = place.layer_devices
        self.layer_group = [windows.index(w) for w in self.cfg.layer_windows]
        rows = max(sched.max_num_seqs, 256)
        self.tables = BlockTables(len(windows), self.block_size, -(-sched.max_model_len // self.block_size), 4 * rows)
        self.use_kernels = device.type == "cuda" and kernels == "auto"  # binds the backends (the setter)
        activation = 0
        if device.type == "cuda" and cache.kv_cache_memory is None and cache.num_blocks is None:
            activation = profile_step_bytes(self, sched)
        self.activation_bytes = activation
        self.num_blocks = plan_num_blocks(self.cfg, cache, sched, self.dtype, device, windows,
                                          [i for i in range(self.cfg.num_layers) if not place.on_host(i)],
                                          activation_bytes=activation)
        if self.host is not None:
            host_blocks = plan_num_blocks(self.cfg, cache, sched, self.dtype, self.host, windows,
                                          list(range(place.num_host_layers)), offloaded=True)
            self.num_blocks = [min(a, b) for a, b in zip(self.num_blocks, host_blocks)]
        self.kv_caches = [(self._new_cache(self.num_blocks[g], d), self._new_cache(self.num_blocks[g], d))
                          for g, d in zip(self.layer_group, self.layer_devices)]
        # CUDA: a step returns before its tokens reach the host, so the engine can prepare the next one meanwhile.
        # Offloaded blocks compute on this thread, so there is nothing to overlap: off, and no CUDA graphs.
        self.can_overlap = device.type == "cuda" if sched.async_scheduling is None else sched.async_scheduling
        # --cpu-moe: expert blocks copy to the host and back inside the step (no graphs, nothing to overlap)
        host_work = self.host is not None or bool(place.cpu_moe)
        self.can_overlap = self.can_overlap and not host_work
        if cache.cpu_compile and device.type == "cpu" and self.host is None:
            model.enable_cpu_compile()
        self.graphs = None
        if self.can_overlap or self.use_kernels:  # the decode graphs write their argmax here too
            self.prev_tokens = torch.zeros(rows, dtype=torch.long, device=device)  # last step's sampled tokens
        if self.can_overlap:  # two host buffers: step N's tokens stay readable while N+1 copies its own
            pin = device.type == "cuda"
            self._out_host = [torch.zeros(rows, dtype=torch.long, pin_memory=pin) for _ in range(2)]
            self._flip = 0
        if self.backend.supports_graphs and device.type == "cuda" and cache.cuda_graphs and not host_work:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.kv_caches, self.backend, min(sched.max_num_seqs, 256),
                                       self.tables, device, self.prev_tokens)
            self.graphs.capture()
        if self.use_kernels and self.host is None:
            from .warmup import warm_up_mixed_step

            warm_up_mixed_step(self)

    @property
    def use_kernels(self) -> bool:
        """Whether the device side runs the Triton backend (and the fused blocks)."""
        return self._use_kernels

    @use_kernels.setter
    def use_kernels(self, on: bool) -> None:
        """Choose each side's attention backend and bind the blocks to their side's forward (LlamaModel.bind)."""
        self._use_kernels = on
        place = self.model.placement
        side = [[i for i in range(self.cfg.num_layers) if place.on_host(i) == host] for host in (False, True)]
        self.backend = make_backend(self.model, side[0], self.device, [self._probe(self.device)], self.windows,
                                    self.layer_group, on)
        self.host_backend = None
        if self.host is not None:
            self.host_backend = make_backend(self.model, side[1], self.host, [self._probe(self.host)], self.windows,
                                             self.layer_group, False, on_host=True)
        self.model.bind((on, False))

    def _probe(self, device: torch.device) -> tuple[KVPool, KVPool]:
        """One-block pools of the real pools' kind (what a backend's choice reads)."""
        return self._new_cache(1, device), self._new_cache(1, device)

    def scratch_pools(self, num_blocks: int) -> list[tuple[KVPool, KVPool]]:
        """Per-layer K/V pools of num_blocks blocks for steps outside the real cache (profiling, warm-up)."""
        return [(self._new_cache(num_blocks, d), self._new_cache(num_blocks, d)) for d in self.layer_devices]

    def _new_cache(self, num_blocks: int, device: torch.device) -> KVPool:
        # [num_blocks, block_size, kv_heads, head_dim] in the model dtype, or (--kv-cache-dtype fp8|int8) a
        # QuantizedKVCache: codes of that shape + float32 scales [num_blocks, block_size, kv_heads].
        # On CPU pages are touched only as blocks get used (the reference path never reads unwritten slots
        # except the zeroed null block 0); Triton kernels load whole tiles, so GPU pools start zeroed.
        shape = (num_blocks, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        return new_pool(shape, self.kv_cache_dtype, self.dtype, device, zero=device.type == "cuda")

    @property
    def kv_cache_bytes(self) -> int:
        return sum(pool_nbytes(k) + pool_nbytes(v) for k, v in self.kv_caches)

    @property
    def host_kv_cache_bytes(self) -> int:
        """Bytes of the offloaded blocks' pools (--gpu-layers), 0 when nothing is offloaded."""
        place = self.model.placement
        return sum(pool_nbytes(k) + pool_nbytes(v) for i, (k, v) in enumerate(self.kv_caches) if place.on_host(i))

    # ---- batch preparation ----
    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """-> input ids [T], positions [T], the step's attention metadata (each side's backend), the rows whose
        logits are sampled."""
        dev = self.device
        step = step_inputs(self.tables, batch.token_ids, batch.start_positions, batch.block_tables,
                           batch.seq_keys or None)
        meta = self.backend.build(step)
        if self.host_backend is not None:  # --gpu-layers: the same step for the offloaded blocks, on their device
            meta.host = self.host_backend.build(step)
        cu = step.cu.tolist()
        sample_rows = torch.tensor([cu[i + 1] - 1 for i, s in enumerate(batch.sample) if s is not None],
                                   dtype=torch.long)
        input_ids = torch.tensor([t for ids in batch.token_ids for t in ids], dtype=torch.long)
        input_ids = input_ids.to(self.model.embed_device)
        fix = [(cu[i], r) for i, r in enumerate(batch.prev_rows) if r >= 0]
        if fix:  # decode inputs still on the device: gather them from the previous step's tokens
            dst, src = torch.tensor(fix, dtype=torch.long).to(dev).unbind(1)
            input_ids[dst] = self.prev_tokens[src]
        return input_ids, meta.positions, meta, sample_rows.to(dev)

    # ---- execution ----
    def _graph_decode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits, greedy tokens) via a captured CUDA graph when every sequence decodes one token."""
        if self.graphs is None or any(batch.hidden) or any(len(t) != 1 for t in batch.token_ids):
            return None
        width = max(len(bt[g]) for bt in batch.block_tables for g in range(len(self.windows)))
        if not self.graphs.can_run(len(batch.token_ids), width) or len(batch.seq_keys) != len(batch.token_ids):
            return None
        return self.graphs.run([t[0] for t in batch.token_ids], batch.start_positions, batch.block_tables,
                               batch.seq_keys, batch.prev_rows or None)

    @torch.inference_mode()
    def launch(self, batch: Batch) -> StepHandle:
        """Run one step. On CUDA the sampled tokens stay on the device (they feed the next step through
        Batch.prev_rows) and are copied to the host asynchronously; the handle waits for them. Rows asked for in
        Batch.hidden come back in StepHandle.hidden (the engine runs such steps without overlap)."""
        reqs = [s for s in batch.sample if s is not None]
        greedy = None
        rows = None
        graph_out = self._graph_decode(batch)
        if graph_out is not None:
            logits, greedy = graph_out
            if any(not r.params.greedy or needs_host_sampling(r.params) for r in reqs):
                logits = logits.float()  # the head's raw output (cuda_graphs.py); a no-op for fp32 logits
        else:
            input_ids, positions, meta, sample_rows = self.prepare(batch)
            hidden = self.model.forward(input_ids, positions, meta, self.kv_caches)
            if any(batch.hidden):
                rows = _hidden_rows(hidden, batch)
            if not reqs:
                return StepHandle(SampleResult([], []), hidden=rows)
            logits = self.model.compute_logits(hidden[sample_rows])
        if rows is not None or any(needs_host_sampling(r.params) for r in reqs):
            return StepHandle(sample(logits, reqs), hidden=rows)
        tokens = sample_tokens(logits, reqs, greedy)
        n = len(reqs)
        if not self.can_overlap:
            return StepHandle(SampleResult(tokens.tolist(), [None] * n))
        if tokens is not greedy:  # a graph writes its argmax into prev_tokens itself
            self.prev_tokens[:n].copy_(tokens)
        host = self._out_host[self._flip][:n]
        self._flip ^= 1
        host.copy_(tokens, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return StepHandle(host=host, event=event)

    @torch.inference_mode()
    def logits_for(self, batch: Batch) -> torch.Tensor:
        """Logits of every token of the batch (used by perplexity and tests)."""
        input_ids, positions, meta, _ = self.prepare(batch)
        return self.model.compute_logits(self.model.forward(input_ids, positions, meta, self.kv_caches))


def _hidden_rows(hidden: torch.Tensor, batch: Batch) -> list[torch.Tensor | None]:
    """Each sequence's requested rows of the step's final hidden states [T, H], as float32 host tensors."""
    out: list[torch.Tensor | None] = []
    end = 0
    for ids, kind in zip(batch.token_ids, batch.hidden):
        start, end = end, end + len(ids)
        if kind == HIDDEN_LAST:
            start = end - 1
        out.append(None if kind == HIDDEN_NONE else hidden[start:end].float().cpu())
    return out
