"""BlockPool on its own: ref counts, the LRU free queue, eviction of cached blocks, the hash index."""
from __future__ import annotations

import pytest

from hearthlm.engine.kv_cache import NULL_BLOCK, BlockPool


def test_fresh_pool_hands_out_every_block_but_the_null_block_in_order():
    pool = BlockPool(5)
    assert pool.capacity == pool.num_free == 4
    assert [pool.allocate() for _ in range(4)] == [1, 2, 3, 4]
    assert pool.num_free == 0 and NULL_BLOCK not in pool.free_queue
    with pytest.raises(KeyError):  # callers check num_free first (KVCacheManager.allocate)
        pool.allocate()


def test_ref_counts_and_release_order_is_lru():
    pool = BlockPool(5)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.touch(b)
    assert pool.ref_counts[b] == 2
    pool.release(b)
    assert b not in pool.free_queue  # still held once
    pool.release(c)
    pool.release(a)
    pool.release(b)
    assert list(pool.free_queue) == [4, c, a, b]  # never used first, then in release order
    assert [pool.allocate() for _ in range(4)] == [4, c, a, b]


def test_touch_revives_a_free_cached_block_and_removes_it_from_the_queue():
    pool = BlockPool(4)
    b = pool.allocate()
    pool.register(b, b"k", b"pre")
    pool.release(b)
    assert pool.lookup(b"k", b"pre") == b and b in pool.free_queue
    pool.touch(b)
    assert pool.ref_counts[b] == 1 and b not in pool.free_queue
    assert pool.block_hash[b] == b"k"  # a revived block keeps its key


def test_double_release_is_caught():
    pool = BlockPool(3)
    b = pool.allocate()
    pool.release(b)
    with pytest.raises(AssertionError, match="released twice"):
        pool.release(b)


def test_releasing_the_null_block_is_a_no_op():
    pool = BlockPool(3)
    pool.release(NULL_BLOCK)
    assert pool.ref_counts[NULL_BLOCK] == 0 and pool.num_free == 2


def test_allocate_evicts_the_oldest_cached_block_and_its_key():
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(3)]
    for i, b in enumerate(blocks):
        pool.register(b, bytes([i]), b"p%d" % i)
    for b in blocks:
        pool.release(b)
    got = pool.allocate()  # LRU: the first released
    assert got == blocks[0]
    assert pool.block_hash[got] is None and pool.block_preimage[got] is None
    assert pool.lookup(bytes([0]), b"p0") is None
    assert pool.lookup(bytes([1]), b"p1") == blocks[1]  # the others stay cached


def test_first_block_published_under_a_key_keeps_it():
    pool = BlockPool(4)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, b"k", b"pre")
    pool.register(b, b"k", b"pre")
    assert pool.hash_to_block[b"k"] == a and pool.block_hash[b] is None
    pool.register(a, b"other", b"x")  # a block is published once
    assert pool.block_hash[a] == b"k" and b"other" not in pool.hash_to_block
    # evicting the owner frees the key; the duplicate may then publish it
    pool.release(a)
    assert pool.allocate() == 3 and pool.allocate() == a
    assert b"k" not in pool.hash_to_block
    pool.register(b, b"k", b"pre")
    assert pool.lookup(b"k", b"pre") == b


def test_lookup_rejects_a_key_whose_block_holds_other_tokens():
    pool = BlockPool(3)
    b = pool.allocate()
    pool.register(b, b"k", b"mine")
    assert pool.lookup(b"k", b"theirs") is None and pool.rejected_hits == 1
    assert pool.lookup(b"k", b"mine") == b


def test_register_refuses_the_null_block():
    with pytest.raises(AssertionError):
        BlockPool(3).register(NULL_BLOCK, b"k", b"p")
