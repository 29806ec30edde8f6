"""Paged KV-cache bookkeeping: block pools, per-sequence block tables, prefix hashing, LRU reuse.

Tensors live in the runner; this module only hands out block ids. Layers are split into groups
by attention window: full-attention layers keep every block, sliding-window layers release the
blocks that fall out of their window (their table slot is set to the reserved null block 0).

Prefix caching needs a full-attention group (the first group), which anchors the key chain. Every group publishes
its blocks under the same keys; a sliding group's released blocks stay cached in its LRU. A hit of n blocks
needs, in each sliding group, the blocks of the last window before token n x block size (its earlier slots are
the null block); n shrinks until every group has them.

Prefix cache keys are SHA-256 chains: key_i = SHA-256(key_{i-1} || token ids of block i as little-endian
int64), with key_{-1} = SHA-256(b"hearthlm-prefix-v1\0" || block size || group windows || salt). A block is
published only once the KV of all its tokens is written, and a hit is served only when the block's stored
preimage (parent key and tokens) equals the lookup's, so a key collision can never serve another prompt's KV.
"""
from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Tokens
from dataclasses import dataclass

from ..plan.memory import kv_blocks_per_seq, kv_group_order
from .sequence import Sequence

NULL_BLOCK = 0


class BlockPool:
    """Reference-counted blocks with LRU reuse of freed blocks that still hold a cached prefix."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_preimage: list[bytes | None] = [None] * num_blocks  # parent key || packed tokens
        # a published block's parent: (block, its generation) when it was published; None for a first block
        self.block_parent: list[tuple[int, int] | None] = [None] * num_blocks
        self.generation = [0] * num_blocks  # bumped each time a block is handed out again
        self.hash_to_block: dict[bytes, int] = {}
        self.rejected_hits = 0  # lookups whose key matched a block holding other tokens (a key collision)
        # blocks with ref 0, oldest first; block 0 is the null block and never handed out
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    def allocate(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict the cached prefix this block held
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
            self.block_preimage[block] = None
            self.block_parent[block] = None
        self.generation[block] += 1
        self.ref_counts[block] = 1
        return block

    def touch(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        if block == NULL_BLOCK:
            return
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released twice"
        if self.ref_counts[block] == 0:
            self.free_queue[block] = None

    def lookup(self, h: bytes, preimage: bytes, parent: int | None = None) -> int | None:
        """The cached block for key h, only if it holds exactly these tokens after exactly this parent key, and
        was computed after `parent` (the block the caller matched before it; None for a first block) as it is
        now: a key collision anywhere up the chain cannot lead to KV computed after other tokens."""
        block = self.hash_to_block.get(h)
        if block is None:
            return None
        if self.block_preimage[block] != preimage or self.block_parent[block] != (
                None if parent is None else (parent, self.generation[parent])):
            self.rejected_hits += 1
            return None
        return block

    def register(self, block: int, h: bytes, preimage: bytes, parent: tuple[int, int] | None = None) -> None:
        """Publish a block whose KV is fully written, computed after `parent` ((block, generation) of the
        published block holding the same tokens as its own parent; None for a first block); the first block
        published under a key keeps it."""
        assert block != NULL_BLOCK, "the null block holds no KV"
        if self.block_hash[block] is None and h not in self.hash_to_block:
            self.block_hash[block] = h
            self.block_preimage[block] = preimage
            self.block_parent[block] = parent
            self.hash_to_block[h] = block


@dataclass
class KVGroup:
    window: int | None  # None = full attention
    layers: list[int]
    pool: BlockPool


def kv_group_windows(layer_windows: list[int | None]) -> list[int | None]:
    """The KV groups' windows in their fixed order (full attention first); runner, manager and plan share it."""
    return kv_group_order(layer_windows)


def _digest(data: bytes) -> bytes:
    """The hashing primitive of prefix keys (tests patch it to inject collisions)."""
    return hashlib.sha256(data).digest()


def pack_tokens(tokens: Tokens[int]) -> bytes:
    """Token ids as little-endian int64 bytes (cheap to hash; no str())."""
    packed = array("q", tokens)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def root_key(block_size: int, windows: list[int | None], salt: bytes = b"") -> bytes:
    """The parent key of every first block: binds keys to the KV layout and the engine's salt."""
    layout = f"{block_size}|{','.join('full' if w is None else str(w) for w in windows)}|".encode()
    return _digest(b"hearthlm-prefix-v1\0" + layout + salt)


def block_preimage(parent: bytes, tokens: Tokens[int]) -> bytes:
    return parent + pack_tokens(tokens)


def chain_key(parent: bytes, tokens: Tokens[int]) -> bytes:
    """SHA-256 digest keying a full block of `tokens` that follows the block keyed `parent`."""
    return _digest(block_preimage(parent, tokens))


class KVCacheManager:
    def __init__(self, layer_windows: list[int | None], block_size: int, num_blocks_per_group: list[int],
                 enable_prefix_caching: bool = True, salt: bytes = b""):
        """salt: anything else that changes the KV for the same tokens (e.g. cache dtype, model identity)."""
        self.block_size = block_size
        windows = kv_group_windows(layer_windows)
        self.root_key = root_key(block_size, windows, salt)
        self.full_attention_only = windows == [None]
        # a full-attention group anchors the chain (models with sliding layers only run without prefix caching)
        self.enable_prefix_caching = enable_prefix_caching and windows[0] is None
        self.groups = [
            KVGroup(w, [i for i, lw in enumerate(layer_windows) if lw == w],
                    BlockPool(n))
            for w, n in zip(windows, num_blocks_per_group)
        ]
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found cached

    # ---- sizing helpers ----
    def blocks_needed(self, group: KVGroup, num_tokens: int, chunk: int) -> int:
        """Blocks a sequence of num_tokens holds at its peak in this group, steps of up to `chunk` tokens: the
        plan's formula (plan.memory.kv_blocks_per_seq), which also sizes the pool."""
        return kv_blocks_per_seq(group.window, num_tokens, self.block_size, chunk)

    def fits_ever(self, num_tokens: int, chunk: int) -> bool:
        return all(self.blocks_needed(g, num_tokens, chunk) <= g.pool.capacity for g in self.groups)

    @property
    def usage(self) -> float:
        used = sum(g.pool.capacity - g.pool.num_free for g in self.groups)
        return used / max(1, sum(g.pool.capacity for g in self.groups))

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def all_free(self) -> bool:
        return all(g.pool.num_free == g.pool.capacity for g in self.groups)

    # ---- per-sequence operations ----
    def _preimage(self, seq: Sequence, ids: list[int], i: int) -> bytes:
        parent = seq.kv.block_hashes[i - 1] if i else self.root_key
        return block_preimage(parent, ids[i * self.block_size:(i + 1) * self.block_size])

    def _update_hashes(self, seq: Sequence, upto_tokens: int) -> list[int]:
        """Keys of the full blocks among the first upto_tokens known tokens; returns the known token ids."""
        ids = seq.all_ids
        num_blocks = min(upto_tokens, len(ids)) // self.block_size
        for i in range(len(seq.kv.block_hashes), num_blocks):
            seq.kv.block_hashes.append(_digest(self._preimage(seq, ids, i)))
        return ids

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for the longest cached prefix; returns the number of tokens reused."""
        if not seq.kv.block_tables:
            seq.kv.block_tables = [[] for _ in self.groups]
        if not self.enable_prefix_caching or seq.num_computed_tokens:
            return 0
        # at least one token must be computed to produce logits
        ids = self._update_hashes(seq, seq.num_tokens - 1)
        hashes = seq.kv.block_hashes[:(seq.num_tokens - 1) // self.block_size]
        pool = self.groups[0].pool
        matched: list[int] = []
        preimages: list[bytes] = []
        for i, h in enumerate(hashes):
            preimages.append(self._preimage(seq, ids, i))
            block = pool.lookup(h, preimages[i], matched[-1] if matched else None)
            if block is None:
                break
            matched.append(block)
        n, windows = len(matched), None
        while n and (windows := self._window_hits(hashes, preimages, n)) is None:
            n -= 1  # a sliding group lost a block of that window: a shorter prefix may still be whole
        for block in matched[:n]:
            pool.touch(block)
        seq.kv.block_tables[0] = matched[:n]
        for gi, blocks in enumerate(windows or [], start=1):
            for block in blocks:
                if block != NULL_BLOCK:
                    self.groups[gi].pool.touch(block)
            seq.kv.block_tables[gi] = blocks
        seq.kv.num_registered = n  # published already
        seq.num_computed_tokens = n * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        return seq.num_computed_tokens

    def _window_hits(self, hashes: list[bytes], preimages: list[bytes], n: int) -> list[list[int]] | None:
        """Each sliding group's table for a hit of n blocks (null blocks, then the cached blocks the first
        uncached token's window reaches), or None when a group lacks one of them."""
        tables = []
        for g in self.groups[1:]:
            keep_from = max(0, n * self.block_size - g.window + 1) // self.block_size
            table = [NULL_BLOCK] * keep_from
            for i in range(keep_from, n):
                block = g.pool.lookup(hashes[i], preimages[i])  # the chain was checked in the first group
                if block is None:
                    return None
                table.append(block)
            tables.append(table)
        return tables

    def count_admission(self, seq: Sequence) -> None:
        """Prefix-cache statistics for a sequence admitted after match_prefix: counted once per admission, not
        per attempt (a request waiting for blocks is matched again at every step)."""
        if self.enable_prefix_caching:
            self.prefix_queries += len(seq.prompt_ids)
            self.prefix_hits += min(seq.num_cached_tokens, len(seq.prompt_ids))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Ensure blocks for the next num_new_tokens; False (nothing changed) if the pool is short."""
        if not seq.kv.block_tables:
            seq.kv.block_tables = [[] for _ in self.groups]
        bs = self.block_size
        end = seq.num_computed_tokens + num_new_tokens
        if self.full_attention_only and end <= len(seq.kv.block_tables[0]) * bs:
            return True  # decode inside the last block: nothing to do
        needs = []
        for g, table in zip(self.groups, seq.kv.block_tables):
            if g.window is not None:
                self._release_outside_window(g, table, seq.num_computed_tokens)
            needs.append(max(0, -(-end // bs) - len(table)))
        if any(n > g.pool.num_free for n, g in zip(needs, self.groups)):
            return False
        for n, g, table in zip(needs, self.groups, seq.kv.block_tables):
            table.extend(g.pool.allocate() for _ in range(n))
        return True

    def _release_outside_window(self, g: KVGroup, table: list[int], first_query_pos: int) -> None:
        # keys needed by the earliest query start at first_query_pos - window + 1
        keep_from = max(0, first_query_pos - g.window + 1) // self.block_size
        for i in range(min(keep_from, len(table))):
            if table[i] != NULL_BLOCK:
                g.pool.release(table[i])
                table[i] = NULL_BLOCK

    def commit(self, seq: Sequence) -> None:
        """Publish the sequence's newly computed full blocks to the prefix cache.

        Only blocks inside the computed prefix qualify: num_computed_tokens counts tokens whose KV-writing step
        has been launched, and every later reader is launched after it on the same stream. Blocks past it (a
        prefill chunk ending inside a block, a prompt hashed ahead by match_prefix) stay private until computed,
        so abort and preemption free them unpublished."""
        if not self.enable_prefix_caching or not seq.kv.block_tables:
            return
        table = seq.kv.block_tables[0]
        upto = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        upto = min(upto, len(table))
        if upto <= seq.kv.num_registered:
            return
        ids = self._update_hashes(seq, upto * self.block_size)
        pool = self.groups[0].pool
        first = seq.kv.num_registered
        prev = self._preimage(seq, ids, first - 1) if first else None  # block i - 1's, carried through the loop
        for i in range(first, upto):
            parent = None
            if i:  # the chain goes on only under a published parent with this sequence's own tokens
                holder = pool.hash_to_block.get(seq.kv.block_hashes[i - 1])
                if holder is None or pool.block_preimage[holder] != prev:
                    break  # a key collision (or an evicted parent): the rest of this sequence stays private
                parent = (holder, pool.generation[holder])
            prev = self._preimage(seq, ids, i)
            pool.register(table[i], seq.kv.block_hashes[i], prev, parent)
            for g, own in zip(self.groups[1:], seq.kv.block_tables[1:]):
                if own[i] != NULL_BLOCK:  # (a block already out of its window was released unpublished)
                    g.pool.register(own[i], seq.kv.block_hashes[i], prev)
        seq.kv.num_registered = upto

    def free(self, seq: Sequence) -> None:
        # tail blocks go first into the LRU queue so they are evicted before the shared prefix
        for g, table in zip(self.groups, seq.kv.block_tables):
            for block in reversed(table):
                g.pool.release(block)
        seq.kv.block_tables = []
        seq.kv.num_registered = 0
