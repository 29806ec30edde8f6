"""Scheduler without a model: token budgets, max_num_seqs, chunked prefill, preemption order under KV pressure,
FIFO admission, running sequences first, n > 1 siblings. Sim (sim.py) checks every batch's invariants."""
from __future__ import annotations

from hearthlm.config import SchedulerConfig
from hearthlm.engine.kv_cache import KVCacheManager
from hearthlm.engine.sequence import SeqStatus

from .sim import Sim, check_kv, make_seq

BS = 4


def sim(num_blocks: int = 200, budget: int = 16, max_seqs: int = 8, chunked: bool = True, max_len: int = 256,
        prefix: bool = True, windows=(None,), overlap: bool = False) -> Sim:
    kv = KVCacheManager(list(windows), BS, [num_blocks] * len(set(windows)), enable_prefix_caching=prefix)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len,
                          enable_chunked_prefill=chunked)
    return Sim(kv, cfg, overlap=overlap)


def prompt(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


def test_decodes_go_first_and_a_prefill_chunk_takes_the_rest_of_the_budget():
    s = sim(budget=10)
    a, b = s.add(make_seq(prompt(3, 100))), s.add(make_seq(prompt(3, 200)))
    s.step()
    c = s.add(make_seq(prompt(20, 300)))
    batch = s.step()
    assert batch.seqs == [a, b, c] and batch.num_new_tokens == [1, 1, 8]
    batch = s.step()
    assert batch.seqs == [a, b, c] and batch.num_new_tokens == [1, 1, 8]
    batch = s.step()
    assert batch.num_new_tokens == [1, 1, 4]  # the last chunk; c samples its first token
    assert c.output_ids and c.num_computed_tokens == 20


def test_a_prompt_longer_than_the_budget_is_chunked_to_the_budget():
    s = sim(budget=8)
    a = s.add(make_seq(prompt(21)))
    assert [s.step().num_new_tokens for _ in range(3)] == [[8], [8], [5]]
    assert len(a.output_ids) == 1


def test_without_chunking_a_prompt_goes_whole_and_waits_for_room():
    s = sim(budget=10, chunked=False)
    a, b = s.add(make_seq(prompt(3, 100))), s.add(make_seq(prompt(3, 200)))
    s.step()
    c = s.add(make_seq(prompt(9, 300)))
    d = s.add(make_seq(prompt(2, 400)))
    batch = s.step()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 1]  # 9 > 8 left: c waits, d may not pass it
    assert list(s.sched.waiting) == [c, d] and c.kv.block_tables == [] and c.num_computed_tokens == 0
    s.abort(a)
    batch = s.step()
    assert batch.seqs == [b, c] and batch.num_new_tokens == [1, 9]


def test_max_num_seqs_caps_the_running_set():
    s = sim(max_seqs=2, budget=100)
    seqs = [s.add(make_seq(prompt(3, 100 * i), max_tokens=4)) for i in range(5)]
    batch = s.step()
    assert batch.seqs == seqs[:2] and len(s.sched.running) == 2
    while seqs[0].status is not SeqStatus.FINISHED:
        assert s.step().seqs[:2] == seqs[:2]
    assert s.sched.running == []  # both finished in the same step
    assert s.step().seqs == [seqs[2], seqs[3]]  # the next two in arrival order
    s.run()
    assert all(q.is_finished and len(q.output_ids) == 4 for q in seqs) and s.kv.all_free()


def test_waiting_requests_are_admitted_in_arrival_order():
    s = sim(budget=6, max_seqs=8)
    seqs = [s.add(make_seq(prompt(5, 100 * i), max_tokens=3)) for i in range(6)]
    order = []
    while s.sched.has_unfinished():
        before = set(map(id, s.sched.running))
        batch = s.step()
        order += [q for q in batch.seqs if id(q) not in before and q not in order]
    assert order == seqs


def test_kv_pressure_preempts_the_newest_running_sequence_and_requeues_it_first():
    s = sim(num_blocks=7, budget=32)  # 6 usable blocks
    a = s.add(make_seq(prompt(8, 100), max_tokens=16))  # 24 tokens at most: fits the pool alone
    b = s.add(make_seq(prompt(8, 200), max_tokens=16))
    c = s.add(make_seq(prompt(4, 300), max_tokens=16))
    s.step()
    assert s.sched.running == [a, b, c] and s.kv.groups[0].pool.num_free == 1
    batch = s.step()  # a and b need a third block each: one is left, so c (the newest) gives its block back
    assert batch.preempted == [c] and batch.seqs == [a, b] and list(s.sched.waiting) == [c]
    assert c.num_computed_tokens == 0 and c.num_preemptions == 1 and c.status is SeqStatus.WAITING
    while not s.step().preempted:  # position 12: a fourth block each, none free
        pass
    assert s.steps[-1].preempted == [b] and s.steps[-1].seqs == [a]
    assert list(s.sched.waiting) == [b, c]  # requeued at the head, arrival order kept
    assert s.sched.num_preemptions == 2
    s.run()
    assert all(q.is_finished and len(q.output_ids) == 16 for q in (a, b, c))
    assert s.kv.all_free()


def test_a_lone_sequence_that_cannot_grow_preempts_itself():
    s = sim(num_blocks=3, budget=32)  # 2 usable blocks = 8 tokens
    a = s.add(make_seq(prompt(6), max_tokens=10), unchecked=True)  # add_request would refuse it
    s.step()
    s.step()
    s.step()  # 8 tokens computed
    batch = s.step()
    assert batch.preempted == [a] and not batch.seqs and list(s.sched.waiting) == [a]
    assert s.kv.all_free()


def test_preempted_sequences_keep_their_order_at_the_head_of_the_queue():
    s = sim(num_blocks=9, budget=64, prefix=False)  # 8 usable blocks
    seqs = [s.add(make_seq(prompt(7, 100 * i), max_tokens=25)) for i in range(4)]
    s.step()  # 4 x 2 blocks: the pool is full
    assert s.step().seqs == seqs  # position 7 is still in block 1
    batch = s.step()  # position 8 needs a third block each: the newest two go, newest first
    assert batch.preempted == [seqs[3], seqs[2]] and batch.seqs == [seqs[0], seqs[1]]
    assert list(s.sched.waiting) == [seqs[2], seqs[3]]
    s.run()
    assert all(q.is_finished for q in seqs) and s.kv.all_free()


def test_a_preempted_sequence_resumes_from_the_prefix_cache():
    s = sim(num_blocks=9, budget=64)
    a = s.add(make_seq(prompt(16, 100), max_tokens=12))
    b = s.add(make_seq(prompt(8, 200), max_tokens=12))
    s.step()
    while not any(s.steps[-1].preempted for _ in [0]):
        s.step()
    assert s.steps[-1].preempted == [b]
    s.abort(a)
    s.step()  # b comes back: its computed full blocks were published, so they are reused
    assert b.num_cached_tokens >= 8
    s.run()
    assert b.is_finished and len(b.output_ids) == 12 and s.kv.all_free()


def test_finish_removes_a_waiting_sequence_and_frees_a_running_one():
    s = sim(max_seqs=1)
    a, b = s.add(make_seq(prompt(9))), s.add(make_seq(prompt(9, 50)))
    s.step()
    s.abort(b)
    assert list(s.sched.waiting) == [] and b.is_finished
    s.abort(a)
    assert not s.sched.has_unfinished() and s.kv.all_free()
    s.sched.finish(a)  # twice: harmless
    assert s.kv.all_free()


def test_a_pending_last_token_is_not_scheduled_again():
    s = sim(overlap=True)
    a = s.add(make_seq(prompt(3), max_tokens=2))
    b = s.add(make_seq(prompt(3, 50), max_tokens=5))
    s.step()  # prefill both, tokens pending
    batch = s.step()  # both decode their pending token
    assert batch.seqs == [a, b] and a.pending.count == 1
    batch = s.step()  # a's pending token is its last (max_tokens): nothing for a
    assert batch.seqs == [b]
    s.run()
    assert len(a.output_ids) == 2 and len(b.output_ids) == 5 and s.kv.all_free()


def test_siblings_wait_for_the_first_prompt_then_share_its_blocks():
    s = sim(budget=8)
    p = prompt(18)
    first = s.add(make_seq(p, request_id="r", index=0))
    sibs = [s.add(make_seq(p, request_id="r", index=i, parent=first)) for i in (1, 2)]
    late = s.add(make_seq(prompt(3, 500)))
    batch = s.step()
    assert batch.seqs == [first, late] or batch.seqs == [first]  # siblings skipped, later requests may go
    assert all(q in s.sched.waiting for q in sibs)
    assert list(s.sched.waiting)[:2] == sibs  # skipped siblings keep their place at the head
    while first.in_prefill:
        s.step()
    s.step()
    assert all(q.num_cached_tokens == 16 for q in sibs)
    pool = s.kv.groups[0].pool
    assert all(pool.ref_counts[b] == 3 for b in first.kv.block_tables[0][:4])
    s.run()
    assert s.kv.all_free()


def test_sliding_window_model_runs_long_sequences_in_a_small_pool():
    s = sim(num_blocks=8, budget=8, windows=(None, 8), max_len=512)  # full group: 7 blocks = 28 tokens
    s.kv.groups[0].pool.__init__(40)
    a = s.add(make_seq(prompt(30), max_tokens=100))
    s.run()
    assert len(a.output_ids) == 100 and s.kv.all_free()
    check_kv(s.kv, [])


def test_prefix_statistics_count_a_blocked_request_once():
    s = sim(num_blocks=7, budget=64)  # 6 usable blocks
    s.add(make_seq(prompt(16, 100), max_tokens=8))  # 4 blocks now, up to 6
    b = s.add(make_seq(prompt(12, 200), max_tokens=8))  # 3 blocks: waits until the first finishes
    for _ in range(5):
        s.step()
    assert b in s.sched.waiting
    s.run()
    assert s.kv.prefix_queries == 16 + 12
