"""A model-free stand-in for the engine loop, for Scheduler / KVCacheManager tests.

`Sim` drives a real Scheduler and KVCacheManager the way engine.LLMEngine.step does (schedule -> launch ->
read tokens -> commit -> stop checks), optionally overlapping steps like the async CUDA path, and replaces the
model by a shadow KV store: every launched token "writes" its full prefix (the tokens it attends over) into its
slot, and every step "reads" the slots its queries attend to through the block tables. A block table that points
at the wrong block, a shared or published block written again, or a freed block read, shows up as a mismatch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from hearthlm.config import SchedulerConfig
from hearthlm.engine.kv_cache import NULL_BLOCK, KVCacheManager, block_preimage
from hearthlm.engine.scheduler import ScheduledBatch, Scheduler
from hearthlm.engine.sequence import PoolingTask, Sequence, SeqStatus
from hearthlm.sampling import SamplingParams


def make_seq(prompt: list[int], max_tokens: int = 8, request_id: str = "r", index: int = 0,
             parent: Sequence | None = None) -> Sequence:
    """A Sequence as LLMEngine.add_request builds one (max_tokens already resolved)."""
    return Sequence(request_id, index, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0),
                    seed=index, parent=parent)


def check_kv(kv: KVCacheManager, live: list[Sequence]) -> None:
    """Pool invariants: ref counts equal the number of table entries holding a block; a block is in the free
    queue iff nobody holds it; the null block is never free nor held; the hash index agrees with the blocks."""
    for gi, g in enumerate(kv.groups):
        pool = g.pool
        holders = [0] * pool.num_blocks
        for seq in live:
            if not seq.kv.block_tables:
                continue
            table = seq.kv.block_tables[gi]
            real = [b for b in table if b != NULL_BLOCK]
            assert len(real) == len(set(real)), f"seq {seq.seq_id} holds a block twice: {table}"
            if g.window is None:
                assert NULL_BLOCK not in table, "full-attention tables never hold the null block"
            for b in real:
                holders[b] += 1
        assert pool.ref_counts[NULL_BLOCK] == 0 and NULL_BLOCK not in pool.free_queue
        for b in range(1, pool.num_blocks):
            assert pool.ref_counts[b] == holders[b], f"group {gi} block {b}: ref {pool.ref_counts[b]} != " \
                                                    f"{holders[b]} holders"
            assert (b in pool.free_queue) == (holders[b] == 0), f"group {gi} block {b}: free and held"
        assert pool.num_free == sum(1 for b in range(1, pool.num_blocks) if holders[b] == 0)
        for h, b in pool.hash_to_block.items():
            assert pool.block_hash[b] == h
        for b in range(pool.num_blocks):
            if pool.block_hash[b] is not None:
                assert pool.block_preimage[b] is not None
        if gi == 0 and kv.enable_prefix_caching:
            for seq in live:
                for i, h in enumerate(seq.kv.block_hashes):  # the chain: key_i = H(key_{i-1} || tokens of block i)
                    assert h == kv_key(kv, seq, i)


def kv_key(kv: KVCacheManager, seq: Sequence, i: int) -> bytes:
    from hearthlm.engine.kv_cache import _digest

    parent = seq.kv.block_hashes[i - 1] if i else kv.root_key
    bs = kv.block_size
    return _digest(block_preimage(parent, seq.all_ids[i * bs:(i + 1) * bs]))


def make_pooling_seq(prompt: list[int], all_rows: bool, request_id: str = "e") -> Sequence:
    """A Sequence as LLMEngine.add_pooling_request builds one."""
    return Sequence(request_id, 0, list(prompt), SamplingParams(max_tokens=1, temperature=0.0), seed=0,
                    pooling=PoolingTask(all_rows))


@dataclass
class SimSeq:
    seq: Sequence
    stream: list[int]  # the tokens the "model" samples for this sequence, fixed up front (seeded sampling)
    stop_at: int | None = None  # output length at which a stop token ends it


@dataclass
class Sim:
    kv: KVCacheManager
    config: SchedulerConfig
    overlap: bool = False  # launch step N+1 before reading step N's tokens (the async engine path)
    sched: Scheduler = field(init=False)
    seqs: dict[int, SimSeq] = field(default_factory=dict)
    store: list[dict[int, tuple]] = field(init=False)  # per group: slot -> the token prefix whose KV it holds
    inflight: list | None = None
    steps: list[ScheduledBatch] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sched = Scheduler(self.config, self.kv)
        self.store = [{} for _ in self.kv.groups]

    # ---- requests ----
    def add(self, seq: Sequence, stream: list[int] | None = None, stop_at: int | None = None,
            unchecked: bool = False) -> Sequence:
        stream = stream if stream is not None else [1000 + seq.seq_id * 7 + k for k in range(seq.params.max_tokens)]
        # LLMEngine.add_request refuses what the pool could never hold (it would preempt itself forever)
        total = seq.num_tokens + (0 if seq.pooling is not None else seq.params.max_tokens)
        assert unchecked or self.kv.fits_ever(total, self.config.max_num_batched_tokens)
        self.seqs[seq.seq_id] = SimSeq(seq, stream, stop_at)
        self.sched.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if not seq.is_finished:
            seq.result.finish_reason = "abort"
            self.sched.finish(seq)
            self.finished.append(seq)

    def live(self) -> list[Sequence]:
        return list(self.sched.running) + list(self.sched.waiting)

    # ---- the engine loop ----
    def token_at(self, seq: Sequence, pos: int) -> int:
        """Token id at position pos, pending tokens included (the model knows what it will sample)."""
        n = len(seq.prompt_ids)
        return seq.prompt_ids[pos] if pos < n else self.seqs[seq.seq_id].stream[pos - n]

    def step(self) -> ScheduledBatch:
        previous, self.inflight = self.inflight, None
        # LLMEngine: no overlap while a pooling request is unfinished (its rows are read on the host)
        overlap = self.overlap and not any(s.seq.pooling is not None and not s.seq.is_finished
                                           for s in self.seqs.values())
        if previous is not None and not overlap:
            self._finish(previous)
            previous = None
        before_running = list(self.sched.running)
        batch = self.sched.schedule()
        self.steps.append(batch)
        self.check_batch(batch, before_running)
        launched = self._launch(batch) if batch else None
        if previous is not None:
            self._finish(previous)
        if launched is not None:
            if overlap:
                self.inflight = launched
            else:
                self._finish(launched)
        check_kv(self.kv, self.live())
        return batch

    def _launch(self, batch: ScheduledBatch) -> list:
        bs = self.kv.block_size
        sampled = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            if not (n == 1 and start == seq.num_tokens - 1):
                assert not seq.pending.count, "a prefill chunk never contains a pending token"
            for gi, g in enumerate(self.kv.groups):
                table = seq.kv.block_tables[gi]
                assert len(table) * bs >= start + n, "no block for a token of this step"
                for pos in range(start, start + n):  # write this step's KV
                    block = table[pos // bs]
                    assert block != NULL_BLOCK
                    pool = g.pool
                    assert pool.ref_counts[block] == 1, f"write into block {block} shared by {pool.ref_counts[block]}"
                    assert pool.block_hash[block] is None, f"write into published block {block}"
                    self.store[gi][block * bs + pos % bs] = self._prefix(seq, pos)
                for q in range(start, start + n):  # read what the queries attend to
                    lo = 0 if g.window is None else max(0, q - g.window + 1)
                    for pos in range(lo, q + 1):
                        block = table[pos // bs]
                        assert block != NULL_BLOCK, f"query {q} reads released block of position {pos}"
                        got = self.store[gi].get(block * bs + pos % bs)
                        assert got == self._prefix(seq, pos), f"seq {seq.seq_id} pos {pos}: wrong KV in block {block}"
            samples = start + n == seq.num_tokens and seq.pooling is None
            if seq.pooling is not None and (seq.pooling.all_rows or start + n == seq.num_tokens):
                # the rows the runner hands back: every new token's, or the prompt's last
                seq.pooling.chunks.append(list(range(start, start + n)) if seq.pooling.all_rows else [start + n - 1])
            seq.num_computed_tokens += n
            if samples:
                seq.pending.count += 1
            sampled.append((seq, samples))
        return sampled

    def _prefix(self, seq: Sequence, pos: int) -> tuple:
        return tuple(self.token_at(seq, p) for p in range(pos + 1))

    def _finish(self, launched: list) -> None:
        for seq, samples in launched:
            if seq.is_finished:
                continue
            if samples:
                seq.pending.count -= 1
                seq.output_ids.append(self.seqs[seq.seq_id].stream[len(seq.output_ids)])
            self.kv.commit(seq)
            if seq.pooling is not None and seq.num_computed_tokens == seq.num_tokens:
                rows = [r for c in seq.pooling.chunks for r in c]
                n = len(seq.prompt_ids)
                assert rows == (list(range(n)) if seq.pooling.all_rows else [n - 1]), f"pooled rows {rows}"
                seq.result.finish_reason = "stop"
                self.sched.finish(seq)
                self.finished.append(seq)
            if not samples:
                continue
            s = self.seqs[seq.seq_id]
            if s.stop_at is not None and len(seq.output_ids) >= s.stop_at:
                seq.result.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_known_tokens >= self.config.max_model_len:
                seq.result.finish_reason = "length"
            if seq.result.finish_reason is not None:
                self.sched.finish(seq)
                self.finished.append(seq)

    def check_batch(self, batch: ScheduledBatch, before_running: list[Sequence]) -> None:
        cfg = self.config
        assert len(batch.seqs) == len(batch.num_new_tokens) == len({id(s) for s in batch.seqs})
        assert sum(batch.num_new_tokens) <= cfg.max_num_batched_tokens
        assert len(self.sched.running) <= cfg.max_num_seqs
        assert all(n >= 1 for n in batch.num_new_tokens)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert seq.status is SeqStatus.RUNNING and seq in self.sched.running
            assert seq.num_computed_tokens + n <= seq.num_tokens
            if not cfg.enable_chunked_prefill:
                assert seq.num_computed_tokens + n == seq.num_tokens, "a whole prefill without chunking"
        # running sequences first, in their order; then admissions from the head of the waiting queue
        old = [s for s in batch.seqs if s in before_running]
        assert batch.seqs[:len(old)] == old
        assert old == [s for s in before_running if s in old]
        new = batch.seqs[len(old):]
        assert self.sched.running == [s for s in before_running if s not in batch.preempted] + new
        if new and cfg.enable_chunked_prefill:  # waiting requests get only what running ones left over
            for q in before_running:
                assert q in batch.seqs or q.ends_with_pending(cfg.max_model_len), "a running sequence was passed over"
        # preemption: the newest running first, requeued at the head, nothing admitted in that step
        if batch.preempted:
            assert not new
            k = len(batch.preempted)
            assert batch.preempted == before_running[::-1][:k]
            assert list(self.sched.waiting)[:k] == batch.preempted[::-1]
            for v in batch.preempted:
                assert v.status is SeqStatus.WAITING and v.num_computed_tokens == 0 and not v.kv.block_tables
                assert v not in batch.seqs

    def run(self, max_steps: int = 10_000, rng: random.Random | None = None, abort_p: float = 0.0) -> None:
        for _ in range(max_steps):
            if not (self.sched.has_unfinished() or self.inflight):
                return
            if rng is not None and abort_p and rng.random() < abort_p:
                live = self.live()
                if live:
                    self.abort(rng.choice(live))
            self.step()
        raise AssertionError("the scheduler made no progress")
