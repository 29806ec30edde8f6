"""KVCacheManager without a model: allocation, prefix-hash chains and reuse, LRU eviction, sliding-window
release, freeing on abort, out-of-blocks behaviour."""
from __future__ import annotations

import pytest

from hearthlm.engine.kv_cache import NULL_BLOCK, KVCacheManager, chain_key, root_key
from hearthlm.plan.memory import kv_blocks_per_seq

from .sim import check_kv, make_seq

BS = 4


def kv_full(num_blocks: int = 17, prefix: bool = True) -> KVCacheManager:
    return KVCacheManager([None, None], BS, [num_blocks], enable_prefix_caching=prefix)


def compute(kv: KVCacheManager, seq, n: int) -> None:
    """One engine step of n tokens for seq: blocks, KV written, then published."""
    assert kv.allocate(seq, n)
    seq.num_computed_tokens += n
    kv.commit(seq)


def run_prompt(kv: KVCacheManager, seq) -> None:
    kv.match_prefix(seq)
    compute(kv, seq, seq.num_tokens - seq.num_computed_tokens)


def test_allocate_covers_the_new_tokens_and_decodes_inside_a_block_take_nothing():
    kv = kv_full()
    s = make_seq(list(range(10)))
    kv.match_prefix(s)
    assert kv.allocate(s, 10) and len(s.kv.block_tables[0]) == 3
    s.num_computed_tokens = 10
    free = kv.groups[0].pool.num_free
    assert kv.allocate(s, 2) and kv.groups[0].pool.num_free == free  # tokens 10, 11 fit block 2
    assert kv.allocate(s, 3) and len(s.kv.block_tables[0]) == 4
    check_kv(kv, [s])
    kv.free(s)
    assert kv.all_free() and s.kv.block_tables == [] and s.kv.num_registered == 0


def test_out_of_blocks_returns_false_and_changes_nothing():
    kv = kv_full(num_blocks=5)  # 4 usable blocks
    a, b = make_seq(list(range(9))), make_seq(list(range(50, 59)))
    kv.match_prefix(a)
    kv.match_prefix(b)
    assert kv.allocate(a, 9)  # 3 blocks
    before = (list(b.kv.block_tables[0]), kv.groups[0].pool.num_free)
    assert not kv.allocate(b, 9)
    assert (b.kv.block_tables[0], kv.groups[0].pool.num_free) == before
    assert kv.allocate(b, 4) and not kv.allocate(b, 5)
    check_kv(kv, [a, b])


def test_fits_ever_uses_the_plan_formula():
    kv = KVCacheManager([None, 8], BS, [11, 6], enable_prefix_caching=False)
    assert kv.fits_ever(40, 1) and not kv.fits_ever(41, 1)  # full group: 10 usable blocks
    assert kv_blocks_per_seq(8, 1000, BS, 9) == 5 and kv.fits_ever(40, 9)
    assert not kv.fits_ever(40, 10)  # the window group needs 6 blocks for a 10-token chunk


def test_prefix_chain_keys():
    kv = kv_full()
    s = make_seq(list(range(11)))
    run_prompt(kv, s)
    r = root_key(BS, [None])
    k0 = chain_key(r, [0, 1, 2, 3])
    assert s.kv.block_hashes == [k0, chain_key(k0, [4, 5, 6, 7])]  # the partial block has no key
    assert s.kv.num_registered == 2
    assert kv.root_key != root_key(BS, [None], salt=b"other model")
    assert KVCacheManager([None], BS, [4], salt=b"x").root_key == root_key(BS, [None], b"x")


def test_same_prompt_reuses_all_full_blocks_but_the_last_token():
    kv = kv_full()
    a = make_seq(list(range(12)))  # exactly 3 blocks
    run_prompt(kv, a)
    b = make_seq(list(range(12)))
    assert kv.match_prefix(b) == 8  # the last block is recomputed: at least one token makes logits
    assert b.kv.block_tables[0] == a.kv.block_tables[0][:2]
    assert [kv.groups[0].pool.ref_counts[x] for x in a.kv.block_tables[0]] == [2, 2, 1]
    assert b.num_cached_tokens == 8 and b.kv.num_registered == 2
    compute(kv, b, 4)
    assert b.kv.block_tables[0][2] != a.kv.block_tables[0][2]  # its own copy of the last block
    check_kv(kv, [a, b])
    kv.count_admission(a)  # the scheduler counts a request once, when it is admitted
    kv.count_admission(b)
    assert kv.prefix_queries == 24 and kv.prefix_hits == 8 and kv.prefix_hit_rate == 1 / 3


def test_reuse_stops_at_the_first_different_block_even_if_later_blocks_match():
    kv = kv_full()
    a = make_seq(list(range(16)) + [99])
    run_prompt(kv, a)
    b = make_seq([0, 1, 2, 3, 4, 5, 6, 77] + list(range(8, 16)) + [99])
    assert kv.match_prefix(b) == 4  # block 1 differs; block 2 has a's tokens but another parent
    c = make_seq([0, 1, 2, 3] + list(range(4, 16)) + [5, 5])
    assert kv.match_prefix(c) == 16
    check_kv(kv, [a, b, c])


def test_only_computed_full_blocks_are_published():
    kv = kv_full()
    a = make_seq(list(range(14)))
    kv.match_prefix(a)
    compute(kv, a, 6)  # a chunk ending inside block 1
    assert a.kv.num_registered == 1
    b = make_seq(list(range(14)))
    assert kv.match_prefix(b) == 4
    kv.free(b)
    compute(kv, a, 8)
    assert a.kv.num_registered == 3
    c = make_seq(list(range(14)))
    assert kv.match_prefix(c) == 12


def test_prefix_caching_off_never_shares():
    kv = kv_full(prefix=False)
    a = make_seq(list(range(12)))
    run_prompt(kv, a)
    b = make_seq(list(range(12)))
    assert kv.match_prefix(b) == 0 and a.kv.block_hashes == [] and kv.groups[0].pool.hash_to_block == {}


def test_generated_tokens_are_published_too():
    kv = kv_full()
    a = make_seq([1, 2, 3])
    run_prompt(kv, a)
    for t in (4, 5, 6):  # decode: the sampled token becomes known, then its KV is computed next step
        a.output_ids.append(t)
        compute(kv, a, 1)
    assert a.kv.num_registered == 1  # tokens 1..4 computed; block 1 holds 5, 6 (6 not computed yet)
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.match_prefix(b) == 4


def test_freed_prefix_stays_cached_until_evicted_lru_tail_blocks_first():
    kv = kv_full(num_blocks=7)  # 6 usable
    a = make_seq(list(range(13)))  # 4 blocks, 3 full ones published
    run_prompt(kv, a)
    blocks = list(a.kv.block_tables[0])
    kv.free(a)
    assert kv.all_free()
    # the tail is released first: eviction order is the unused blocks, then a's blocks from the tail
    assert list(kv.groups[0].pool.free_queue) == [5, 6] + blocks[::-1]
    b = make_seq(list(range(13)))
    assert kv.match_prefix(b) == 12
    kv.free(b)
    c = make_seq(list(range(100, 116)))  # 4 blocks: the 2 never used, then a's tail block and block 2
    run_prompt(kv, c)
    d = make_seq(list(range(13)))
    assert kv.match_prefix(d) == 8  # blocks 0 and 1 of the prefix survived
    check_kv(kv, [c, d])


def test_a_cached_block_in_use_is_never_evicted():
    kv = kv_full(num_blocks=5)
    a = make_seq(list(range(9)))
    run_prompt(kv, a)
    b = make_seq(list(range(100, 104)))
    kv.match_prefix(b)
    assert kv.allocate(b, 4)
    assert not kv.allocate(b, 5)  # only a's blocks are left and a holds them
    assert kv.groups[0].pool.lookup(a.kv.block_hashes[0], kv._preimage(a, a.all_ids, 0)) == a.kv.block_tables[0][0]


def test_free_on_abort_mid_prefill_releases_everything_and_publishes_nothing_uncomputed():
    kv = kv_full()
    a = make_seq(list(range(30)))
    kv.match_prefix(a)
    assert kv.allocate(a, 30)
    a.num_computed_tokens = 10  # a chunk of 10 launched; blocks for the rest allocated ahead
    kv.commit(a)
    kv.free(a)
    assert kv.all_free()
    assert len(kv.groups[0].pool.hash_to_block) == 2  # blocks 0, 1 only
    check_kv(kv, [])


def test_sliding_window_releases_blocks_behind_the_window():
    kv = KVCacheManager([None, 6, None, 6], BS, [40, 40], enable_prefix_caching=True)
    assert [g.window for g in kv.groups] == [None, 6] and [g.layers for g in kv.groups] == [[0, 2], [1, 3]]
    assert kv.enable_prefix_caching  # a full-attention group anchors the chain
    assert not KVCacheManager([6, 6], BS, [40]).enable_prefix_caching  # sliding layers only: off
    s = make_seq(list(range(5)), max_tokens=100)
    kv.match_prefix(s)
    compute(kv, s, 5)
    peak = 0
    for t in range(40):
        s.output_ids.append(t)
        assert kv.allocate(s, 1)
        win = s.kv.block_tables[1]
        q = s.num_computed_tokens  # the query's position; keys from q - 5 on are needed
        first_needed = max(0, q - 6 + 1) // BS
        assert all(b == NULL_BLOCK for b in win[:first_needed]) and NULL_BLOCK not in win[first_needed:]
        assert len(win) == len(s.kv.block_tables[0])  # positions keep their table index
        held = sum(b != NULL_BLOCK for b in win)
        peak = max(peak, held)
        s.num_computed_tokens += 1
        check_kv(kv, [s])
    assert peak <= kv_blocks_per_seq(6, 45, BS, 1)
    assert len(s.kv.block_tables[0]) == 12  # full attention keeps all 45 tokens
    kv.free(s)
    assert kv.all_free()


def test_sliding_window_chunked_prefill_stays_within_the_formula():
    kv = KVCacheManager([8], BS, [30], enable_prefix_caching=False)
    s = make_seq(list(range(40)))
    kv.match_prefix(s)
    for _ in range(5):
        assert kv.allocate(s, 8)
        assert sum(b != NULL_BLOCK for b in s.kv.block_tables[0]) <= kv_blocks_per_seq(8, 40, BS, 8)
        s.num_computed_tokens += 8
        check_kv(kv, [s])
    kv.free(s)
    assert kv.all_free()


def test_out_of_blocks_in_one_group_allocates_in_none():
    kv = KVCacheManager([None, 8], BS, [20, 4], enable_prefix_caching=False)  # window group: 3 usable blocks
    s = make_seq(list(range(16)))
    kv.match_prefix(s)
    before = [len(t) for t in s.kv.block_tables], [g.pool.num_free for g in kv.groups]
    assert not kv.allocate(s, 16)  # 4 window blocks needed at once
    assert ([len(t) for t in s.kv.block_tables], [g.pool.num_free for g in kv.groups]) == before
    assert kv.allocate(s, 8)
    check_kv(kv, [s])


@pytest.mark.parametrize("tokens,blocks", [(1, 1), (4, 1), (5, 2), (33, 9)])
def test_blocks_needed_full_attention(tokens, blocks):
    kv = kv_full()
    assert kv.blocks_needed(kv.groups[0], tokens, 1) == blocks


def test_usage_and_hit_rate():
    kv = kv_full(num_blocks=9)
    assert kv.usage == 0 and kv.prefix_hit_rate == 0
    a = make_seq(list(range(8)))
    run_prompt(kv, a)
    assert kv.usage == 2 / 8
    kv.free(a)
    assert kv.usage == 0  # cached but free blocks count as free


def test_a_key_collision_never_serves_the_next_block_of_another_prompt(monkeypatch):
    """A colliding key at block 0 must not let block 1 of the other prompt (same parent key, same tokens) be
    served: its KV was computed after other tokens. (Found by test_randomized with truncated digests.)"""
    import hearthlm.engine.kv_cache as kc

    real = kc._digest
    kv = kv_full()
    first_blocks = {kc.block_preimage(kv.root_key, t) for t in ([1, 1, 1, 1], [2, 2, 2, 2])}
    monkeypatch.setattr(kc, "_digest", lambda data: b"K" * 32 if data in first_blocks else real(data))
    a = make_seq([1, 1, 1, 1, 9])  # publishes its block 0 under K
    run_prompt(kv, a)
    x = make_seq([2, 2, 2, 2, 5, 5, 5, 5, 9])  # block 0 collides with a's (rejected by the preimage check), but
    run_prompt(kv, x)  # its block 1 is published under H(K || 5 5 5 5): KV computed after 2 2 2 2
    c = make_seq([1, 1, 1, 1, 5, 5, 5, 5, 9])
    kv.match_prefix(c)
    assert x.kv.block_tables[0][1] not in c.kv.block_tables[0], "c reads KV computed after another prompt's block 0"


def test_sliding_groups_reuse_the_blocks_of_the_last_window():
    """A hit of n blocks takes every full-attention block and, in the sliding group, only the blocks the first
    uncached token's window reaches (earlier slots null); a sliding block evicted from its LRU shrinks the hit."""
    kv = KVCacheManager([None, 6, None, 6], BS, [40, 40])
    prompt = list(range(100, 130))  # 30 tokens: 7 full blocks
    a = make_seq(prompt, max_tokens=4)
    run_prompt(kv, a)
    kv.free(a)
    b = make_seq(prompt + [7, 8], max_tokens=4)
    assert kv.match_prefix(b) == 28  # (32 - 1) // 4 blocks
    first = max(0, 28 - 6 + 1) // BS
    win = b.kv.block_tables[1]
    assert len(win) == 7 and win[:first] == [NULL_BLOCK] * first and NULL_BLOCK not in win[first:]
    compute(kv, b, b.num_tokens - b.num_computed_tokens)
    check_kv(kv, [b])
    kv.free(b)
    g = kv.groups[1]
    evicted = b.kv.block_hashes[6]
    del g.pool.hash_to_block[evicted]  # as if the LRU had handed that sliding block out again
    c = make_seq(prompt + [9], max_tokens=4)
    assert kv.match_prefix(c) == 24  # 6 blocks: their window (blocks 4 and 5) is still cached
    assert c.kv.block_tables[1][4:] != [NULL_BLOCK, NULL_BLOCK] and len(c.kv.block_tables[0]) == 6
    compute(kv, c, c.num_tokens - c.num_computed_tokens)
    check_kv(kv, [c])
    kv.free(c)
    assert kv.all_free()
