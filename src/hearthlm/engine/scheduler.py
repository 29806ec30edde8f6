"""Continuous batching: a token budget per step shared by decodes and (chunked) prefills."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import SchedulerConfig
from .kv_cache import KVCacheManager
from .sequence import Sequence, SeqStatus


@dataclass
class ScheduledBatch:
    """What the runner executes this step: each sequence with its number of new tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop its KV, requeue it at the front."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        if seq.pooling is not None:
            seq.pooling.reset()
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._num_new(seq, budget)
            if num_new == 0:
                i += 1
                continue
            while not self.kv.allocate(seq, num_new):
                victim = self.running[-1]  # newest first
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1
        if batch.preempted:
            return batch
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.parent is not None and not seq.parent.is_finished and seq.parent.in_prefill:
                # n > 1: wait for the first sibling's prompt blocks, then reuse them from the prefix cache
                skipped.append(self.waiting.popleft())
                continue
            matched = seq.num_computed_tokens == 0
            if matched and (seq.pooling is None or not seq.pooling.all_rows):  # all rows: no state is cached
                self.kv.match_prefix(seq)
            num_new = self._num_new(seq, budget)
            if num_new == 0 or not self.kv.allocate(seq, num_new):
                self.kv.free(seq)
                seq.num_computed_tokens = 0
                break
            if matched:
                self.kv.count_admission(seq)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return batch

    def _num_new(self, seq: Sequence, budget: int) -> int:
        if seq.ends_with_pending(self.config.max_model_len):
            return 0
        remaining = seq.num_tokens - seq.num_computed_tokens
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED
