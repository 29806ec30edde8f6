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
from ..errors import OutOfMemoryError
from ..kernels.kv_quant import KVPool, bytes_per_slot_head, new_pool, pool_nbytes
from ..kernels.paged_attention import USE_DECODE_ORDER, decode_order_of
from ..layers.attention import AttentionMetadata, GroupMeta, SubBatch
from ..models.llama import LlamaModel
from .sampler import SampleRequest, SampleResult, needs_host_sampling, sample, sample_tokens

log = logging.getLogger("hearthlm")


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


class StepHandle:
    """The sampled tokens of a launched step; result() waits for the device only when called."""

    def __init__(self, result: SampleResult | None = None, host: torch.Tensor | None = None, event=None):
        self._result, self._host, self._event = result, host, event

    def result(self) -> SampleResult:
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            tokens = self._host.tolist()
            self._result = SampleResult(tokens, [None] * len(tokens))
        return self._result


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, cache_dtype: str = "auto") -> int:
    """Bytes of K and V for one block of one layer (fp8/int8: codes + float32 scales per slot and kv head)."""
    return 2 * block_size * cfg.num_kv_heads * bytes_per_slot_head(cfg.head_dim, cache_dtype, dtype)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from ..plan.memory import system_memory_bytes

    return system_memory_bytes()


def plan_num_blocks(cfg: ModelConfig, cache: CacheConfig, sched: SchedulerConfig, dtype: torch.dtype,
                    device: torch.device, windows: list[int | None], layers: list[int] | None = None,
                    offloaded: bool = False, activation_bytes: int = 0) -> list[int]:
    """Blocks per KV group (groups ordered as `windows`) for the pools of `layers` (default: all) on `device`.

    What is worth having comes from the plan (plan.memory.kv_pool_blocks, the one KV formula): max_num_seqs
    sequences of max_model_len tokens at their peak, plus the null block. That is the pool on the CPU, capped by
    the memory share: --kv-cache-memory when given, else CacheConfig.memory_fraction of the available RAM minus a
    step's activations (plan.memory.activation_bytes). On CUDA the pool is the share of the free device memory
    after loading, minus `activation_bytes` (ModelRunner._profile_step_bytes), up to what is worth having.
    offloaded: the CPU pools of --gpu-layers' offloaded blocks, which the model cannot run without: half the free
    RAM (pages are touched only as blocks get used). A group with no layer on `device` gets what is worth having.
    cache.num_blocks: exactly that many blocks per group."""
    from ..plan.memory import activation_bytes as plan_activation_bytes, kv_pool_blocks

    bs = cache.block_size
    if cache.num_blocks is not None:
        return [cache.num_blocks] * len(windows)
    per_block = kv_bytes_per_block(cfg, bs, dtype, cache.cache_dtype)
    here = [cfg.layer_windows[i] for i in (range(cfg.num_layers) if layers is None else layers)]
    counts = {w: sum(1 for lw in here if lw == w) for w in windows}
    wanted = kv_pool_blocks(cfg, sched.max_model_len, sched.max_num_seqs, bs, sched.max_num_batched_tokens)
    budget = cache.kv_cache_memory
    if budget is None:
        if device.type == "cuda":
            free = available_memory_bytes(device)
            budget = int(free * cache.memory_fraction) - activation_bytes
            if budget < 2 * per_block * len(here):
                raise OutOfMemoryError(
                    f"after loading the weights {free / 2**30:.2f} GiB of device memory is free, and one step at "
                    f"--max-num-batched-tokens {sched.max_num_batched_tokens} needs {activation_bytes / 2**30:.2f} "
                    f"GiB of activations: nothing is left for the KV cache. Lower --max-num-batched-tokens or "
                    f"--max-num-seqs, raise --gpu-memory-utilization, offload layers (--gpu-layers) or use a "
                    f"smaller quantization (hearth plan shows what fits)")
        elif offloaded:
            budget = int(available_memory_bytes(device) * 0.5)
        else:  # CPU: the plan's pool, within the memory share left after a step's activations
            step = activation_bytes or plan_activation_bytes(
                cfg, sched.max_num_batched_tokens, "f32" if dtype == torch.float32 else "bf16", sched.max_num_seqs)
            budget = int(available_memory_bytes(device) * cache.memory_fraction) - step
    # sliding-window groups (bounded by their window) get what they are worth; full attention the rest of the budget
    out = {w: wanted[w] for w in windows}
    full_layers = counts.get(None, 0)
    if full_layers:
        spent = sum(out[w] * counts[w] * per_block for w in windows if w is not None)
        out[None] = min(wanted[None], max(2, (budget - spent) // (per_block * full_layers)))
    elif windows and counts[windows[0]]:  # only sliding layers: their pool within the budget
        w = windows[0]
        out[w] = min(wanted[w], max(2, budget // (per_block * counts[w])))
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
        self.kv_cache_dtype = cache.cache_dtype
        # --gpu-layers: each block's KV pool lives on that block's device; the block ids are shared by all layers,
        # so a group has one block count: the smaller of what each device's budget allows for its layers
        place = model.placement
        self.host = place.host if place.offloaded else None  # offloaded blocks' device (meta.host lives there)
        self.layer_devices = place.layer_devices
        self.layer_group = [windows.index(w) for w in self.cfg.layer_windows]
        self.use_kernels = device.type == "cuda" and os.environ.get("HEARTH_DISABLE_KERNELS") != "1"
        activation = 0
        if device.type == "cuda" and cache.kv_cache_memory is None and cache.num_blocks is None:
            activation = self._profile_step_bytes(sched)
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
        self.can_overlap = self.can_overlap and self.host is None
        if cache.cpu_compile and device.type == "cpu" and self.host is None:
            model.enable_cpu_compile()
        self.graphs = None
        rows = max(sched.max_num_seqs, 256)
        if self.can_overlap or self.use_kernels:  # the decode graphs write their argmax here too
            self.prev_tokens = torch.zeros(rows, dtype=torch.long, device=device)  # last step's sampled tokens
        if self.can_overlap:  # two host buffers: step N's tokens stay readable while N+1 copies its own
            pin = device.type == "cuda"
            self._out_host = [torch.zeros(rows, dtype=torch.long, pin_memory=pin) for _ in range(2)]
            self._flip = 0
        if self.use_kernels and cache.cuda_graphs and self.host is None:
            from .cuda_graphs import DecodeGraphs

            max_blocks = -(-sched.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(model, self.kv_caches, windows, self.layer_group,
                                       min(sched.max_num_seqs, 256), max_blocks, self.block_size, device,
                                       self.prev_tokens)
            self.graphs.capture()
        if self.use_kernels and self.host is None:
            self._warm_up_mixed_step()

    def _profile_step_bytes(self, sched: SchedulerConfig) -> int:
        """Device memory the largest step needs beyond what is allocated now: one forward over
        min(max_num_batched_tokens, max_model_len) prompt tokens (activations, attention workspaces), then logits
        and a softmax (the sampler's working copy) over max_num_seqs rows. Measured on scratch KV pools that are
        freed again (they are allocated before the baseline, so they do not count)."""
        dev = self.device
        n = min(sched.max_num_batched_tokens, sched.max_model_len)
        blocks = -(-n // self.block_size) + 1
        scratch = self._scratch_pools(blocks)
        batch = Batch([[0] * n], [0], [[list(range(1, blocks))] * len(self.windows)], [None])
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        try:
            with torch.inference_mode():
                ids, pos, meta, _ = self.prepare(batch)
                hidden = self.model.forward(ids, pos, meta, scratch)
                rows = hidden[-1:].expand(min(sched.max_num_seqs, 256), -1).contiguous()
                self.model.compute_logits(rows).softmax(-1)
            torch.cuda.synchronize(dev)
        except torch.cuda.OutOfMemoryError:
            scratch.clear()
            torch.cuda.empty_cache()
            raise OutOfMemoryError(
                f"after loading the weights, one step of {n} tokens (--max-num-batched-tokens "
                f"{sched.max_num_batched_tokens}) does not fit in device memory: lower --max-num-batched-tokens or "
                f"--max-num-seqs, offload layers (--gpu-layers) or use a smaller quantization (hearth plan shows "
                f"what fits)") from None
        peak = torch.cuda.max_memory_allocated(dev) - base
        del scratch, ids, pos, meta, hidden, rows
        torch.cuda.empty_cache()
        log.debug("profiling step of %d tokens: %.1f MiB of activations", n, peak / 2**20)
        return peak

    def _warm_up_mixed_step(self) -> None:
        """Compile at start-up the kernel variants a busy server's first mixed step needs (decode rows beside a
        prompt chunk, token and row counts that are not multiples of 16: Triton specializes on those), rather
        than stalling that step (~1 s on a fresh machine). One step on scratch pools; Triton's disk cache makes
        later start-ups pay nothing."""
        bs = self.block_size
        starts, lens = [19, 40, 7, 0], [1, 1, 1, 37]
        need = [-(-(a + n) // bs) for a, n in zip(starts, lens)]
        scratch = self._scratch_pools(sum(need) + 1)
        first = [1 + sum(need[:i]) for i in range(len(need))]
        tables = [[list(range(f, f + k))] * len(self.windows) for f, k in zip(first, need)]
        batch = Batch([[0] * n for n in lens], starts, tables, [None] * len(lens))
        with torch.inference_mode():
            ids, pos, meta, _ = self.prepare(batch)
            hidden = self.model.forward(ids, pos, meta, scratch)
            self.model.compute_logits(hidden[-2:])
        torch.cuda.synchronize(self.device)
        del scratch

    def _scratch_pools(self, num_blocks: int) -> list[tuple[KVPool, KVPool]]:
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
        groups = []  # per KV group, on the host: (block tables, slot mapping, reference sub-batches or None)
        need_ref = not self.use_kernels or self.host is not None
        for g, window in enumerate(self.windows):
            width = max(len(bt[g]) for bt in batch.block_tables)
            tables = torch.zeros(num_seqs, max(1, width), dtype=torch.int32)
            for i, bt in enumerate(batch.block_tables):
                tables[i, :len(bt[g])] = torch.tensor(bt[g], dtype=torch.int32)
            subs = []
            if need_ref:
                decode = q_lens_t == 1
                for part in (decode, ~decode):
                    rows = part.nonzero().flatten()
                    if len(rows):
                        subs.append(self._sub_batch(tables, rows, starts, q_lens_t, cu, window))
            groups.append((tables, self._slots(tables, seq_rows, positions), subs))
        # mixed step: the leading one-token sequences (running ones come first) take the decode kernel
        num_decodes = next((i for i, n in enumerate(q_lens) if n != 1), 0)
        meta = self._metadata(groups, dev, self.use_kernels, max(q_lens), seq_lens, cu, num_decodes)
        if self.host is not None:  # --gpu-layers: the same step for the offloaded blocks, on their device
            meta.host = self._metadata(groups, self.host, False, max(q_lens), seq_lens, cu)
        sample_rows = torch.tensor([int(cu[i + 1]) - 1 for i, s in enumerate(batch.sample) if s is not None],
                                   dtype=torch.long)
        input_ids = input_ids.to(self.model.embed_device)
        fix = [(int(cu[i]), r) for i, r in enumerate(batch.prev_rows) if r >= 0]
        if fix:  # decode inputs still on the device: gather them from the previous step's tokens
            dst, src = torch.tensor(fix, dtype=torch.long).to(dev).unbind(1)
            input_ids[dst] = self.prev_tokens[src]
        return input_ids, positions.to(dev), meta, sample_rows.to(dev)

    def _metadata(self, groups: list[tuple[torch.Tensor, torch.Tensor, list[SubBatch]]], dev: torch.device,
                  use_kernels: bool, max_query_len: int, seq_lens: torch.Tensor, cu: torch.Tensor,
                  num_decodes: int = 0) -> AttentionMetadata:
        """The step's attention metadata on `dev`: block tables + lengths for the kernels, else sub-batches."""
        gms = []
        for window, (tables, slots, subs) in zip(self.windows, groups):
            gm = GroupMeta(slot_mapping=slots.to(dev), window=window)
            if use_kernels:
                gm.block_tables = tables.to(dev)
            else:
                gm.sub_batches = [SubBatch(*(t.to(dev) for t in (sb.token_index, sb.valid_q, sb.key_slots, sb.mask)))
                                  for sb in subs]
            gms.append(gm)
        meta = AttentionMetadata(groups=gms, layer_group=self.layer_group, max_query_len=max_query_len,
                                 use_kernels=use_kernels, batch_invariant=use_kernels and self.model.batch_invariant)
        if use_kernels:
            meta.seq_lens = seq_lens.to(dev, torch.int32)
            meta.cu_seqlens_q = cu.to(dev, torch.int32)
            meta.num_decodes = num_decodes
            d = len(seq_lens) if max_query_len == 1 else num_decodes
            if d and USE_DECODE_ORDER:
                meta.decode_order = torch.from_numpy(decode_order_of(seq_lens[:d].numpy())).to(dev)
        return meta

    def _sub_batch(self, tables: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor, q_lens: torch.Tensor,
                   cu: torch.Tensor, window: int | None) -> SubBatch:
        """One masked attention batch of the reference path, on the host (`_metadata` moves it)."""
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
        return SubBatch(token_index, valid_q, key_slots, mask[:, None])

    # ---- execution ----
    def _graph_decode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits, greedy tokens) via a captured CUDA graph when every sequence decodes one token."""
        if self.graphs is None or any(len(t) != 1 for t in batch.token_ids):
            return None
        width = max(len(bt[g]) for bt in batch.block_tables for g in range(len(self.windows)))
        if not self.graphs.can_run(len(batch.token_ids), width) or len(batch.seq_keys) != len(batch.token_ids):
            return None
        return self.graphs.run([t[0] for t in batch.token_ids], batch.start_positions, batch.block_tables,
                               batch.seq_keys, batch.prev_rows or None)

    @torch.inference_mode()
    def launch(self, batch: Batch) -> StepHandle:
        """Run one step. On CUDA the sampled tokens stay on the device (they feed the next step through
        Batch.prev_rows) and are copied to the host asynchronously; the handle waits for them."""
        reqs = [s for s in batch.sample if s is not None]
        greedy = None
        graph_out = self._graph_decode(batch)
        if graph_out is not None:
            logits, greedy = graph_out
            if any(not r.params.greedy or needs_host_sampling(r.params) for r in reqs):
                logits = logits.float()  # the head's raw output (cuda_graphs.py); a no-op for fp32 logits
        else:
            input_ids, positions, meta, sample_rows = self.prepare(batch)
            hidden = self.model.forward(input_ids, positions, meta, self.kv_caches)
            if not reqs:
                return StepHandle(SampleResult([], []))
            logits = self.model.compute_logits(hidden[sample_rows])
        if any(needs_host_sampling(r.params) for r in reqs):
            return StepHandle(sample(logits, reqs))
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
