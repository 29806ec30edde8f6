"""The prefix cache serves only computed, collision-free KV: aborts mid-prefill, preemption, key collisions."""
from __future__ import annotations

import hashlib
import struct

import pytest

from hearthlm import SamplingParams
from hearthlm.engine import kv_cache
from hearthlm.engine.kv_cache import KVCacheManager
from hearthlm.engine.sequence import Sequence

from .conftest import needs_default_model, prompts_of

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _tokens(llm, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _abort_after(eng, prompt: list[int], steps: int) -> int:
    """Start `prompt`, run `steps` steps, abort it mid-prefill; returns the tokens it had computed."""
    rid = eng.add_request(prompt, GREEDY)
    for _ in range(steps):
        eng.step()
    computed = eng.requests[rid].seqs[0].num_computed_tokens
    assert 0 < computed < len(prompt) - 1, "meant to abort mid-prefill"
    eng.abort_request(rid)
    return computed


@pytest.mark.parametrize("budget,block_size", [(13, 8), (17, 16), (31, 8), (60, 16), (64, 16)])
def test_abort_mid_prefill_publishes_only_computed_blocks(engine_for, budget, block_size):
    llm = engine_for("llama", max_num_batched_tokens=budget, block_size=block_size)
    ref = engine_for("llama", max_num_batched_tokens=budget, block_size=block_size, enable_prefix_caching=False)
    prompts = prompts_of(2, [100, 140], seed=1000 + budget)
    computed = [_abort_after(llm.engine, p, steps) for p, steps in zip(prompts, (1, 2))]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for out, done in zip(outs, computed):
        # exactly the computed full blocks are reused: never the partly written one, never uncomputed ones
        assert out.num_cached_tokens == done // block_size * block_size
    assert [o.outputs[0].token_ids for o in outs] == _tokens(ref, prompts)


def test_preemption_with_warm_prefix_cache_matches_reference(engine_for):
    llm = engine_for("llama", num_kv_blocks=24, block_size=8, max_num_batched_tokens=31)
    ref = engine_for("llama", block_size=8, max_num_batched_tokens=31, enable_prefix_caching=False)
    prefix = prompts_of(1, [43], seed=2000)[0]
    prompts = [prefix + tail for tail in prompts_of(8, [90, 120, 60, 100], seed=2001)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    _tokens(llm, prompts[:1], params)  # warm: the shared prefix is cached
    eng = llm.engine
    before = eng.scheduler.num_preemptions
    got = _tokens(llm, prompts, params)
    assert eng.scheduler.num_preemptions > before, "the pool was meant to be small enough to preempt"
    assert eng.kv.prefix_hits > 0
    assert got == _tokens(ref, prompts, params)
    assert eng.kv.all_free()


def _manager(block_size: int = 4, blocks: int = 32) -> KVCacheManager:
    return KVCacheManager([None, None], block_size, [blocks])


def _run_prompt(kv: KVCacheManager, ids: list[int]) -> int:
    """Admit `ids`, compute its whole prompt, publish and free it; returns the tokens it found cached."""
    seq = Sequence("r", 0, list(ids), GREEDY, seed=0)
    cached = kv.match_prefix(seq)
    assert kv.allocate(seq, len(ids) - cached)
    seq.num_computed_tokens = len(ids)
    kv.commit(seq)
    kv.free(seq)
    return cached


def test_commit_publishes_only_the_computed_prefix():
    kv = _manager()
    seq = Sequence("r", 0, list(range(3, 30)), GREEDY, seed=0)
    kv.match_prefix(seq)  # hashes ahead over the whole prompt
    assert kv.allocate(seq, 7)
    seq.num_computed_tokens = 7  # the chunk ends inside block 1
    kv.commit(seq)
    assert seq.kv.num_registered == 1 and len(kv.groups[0].pool.hash_to_block) == 1
    kv.free(seq)  # abort: block 1 (partly written) and the rest go back unpublished
    again = Sequence("r2", 0, list(range(3, 30)), GREEDY, seed=0)
    assert kv.match_prefix(again) == 4
    kv.free(again)
    assert kv.all_free()


def test_keys_are_sha256_chains_over_packed_token_ids():
    kv = _manager(block_size=4)
    ids = list(range(100, 111))
    seq = Sequence("r", 0, ids, GREEDY, seed=0)
    kv.match_prefix(seq)
    key = hashlib.sha256(b"hearthlm-prefix-v1\0" + b"4|full|").digest()
    for i in range(2):
        key = hashlib.sha256(key + struct.pack("<4q", *ids[4 * i:4 * i + 4])).digest()
        assert seq.kv.block_hashes[i] == key
    kv.free(seq)
    salted = KVCacheManager([None], 4, [8], salt=b"fp8")
    other = Sequence("r", 0, ids, GREEDY, seed=0)
    salted.match_prefix(other)
    assert other.kv.block_hashes[0] != seq.kv.block_hashes[0]  # the salt (e.g. cache dtype) changes every key
    salted.free(other)


def test_python_hash_collision_is_not_a_hit():
    # hash(2**61 - 1) == hash(0): tuple-of-int hash() keys collide on these two blocks; SHA-256 keys do not
    assert hash((None, (2**61 - 1, 5, 6, 7))) == hash((None, (0, 5, 6, 7)))
    kv = _manager()
    _run_prompt(kv, [2**61 - 1, 5, 6, 7, 8, 9])
    assert _run_prompt(kv, [0, 5, 6, 7, 8, 9]) == 0
    assert _run_prompt(kv, [2**61 - 1, 5, 6, 7, 8, 9]) == 4
    assert kv.all_free()


def test_injected_constant_key_serves_no_foreign_kv(engine_for, monkeypatch):
    """Every key collides (the hashing primitive, old hash() or SHA-256, returns a constant): a hit must still
    hold the very tokens looked up, so the second prompt recomputes and matches the reference."""
    monkeypatch.setattr(kv_cache, "hash", lambda obj: 7, raising=False)
    monkeypatch.setattr(kv_cache, "_digest", lambda data: b"\x07" * 32, raising=False)
    llm = engine_for("llama", max_num_batched_tokens=64, block_size=8)
    ref = engine_for("llama", max_num_batched_tokens=64, block_size=8, enable_prefix_caching=False)
    a, b = prompts_of(2, [40, 40], seed=3000)
    _tokens(llm, [a])
    out = llm.generate([b], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert out.outputs[0].token_ids == _tokens(ref, [b])[0]
    assert llm.engine.kv.groups[0].pool.rejected_hits > 0
    assert llm.generate([a], GREEDY, use_tqdm=False)[0].num_cached_tokens == 8  # its own block still hits


@needs_default_model
def test_abort_mid_prefill_default_model(monkeypatch):
    from hearthlm import LLM

    llm = LLM(dtype="float32", device="cpu", num_kv_blocks=200, block_size=16, max_num_batched_tokens=17)
    prompt = [t % llm.engine.model_config.vocab_size for t in prompts_of(1, [100], seed=4000)[0]]
    assert _abort_after(llm.engine, prompt, 3) == 51
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 48
    monkeypatch.setattr(llm.engine.kv, "enable_prefix_caching", False)  # reference: no lookup, nothing published
    assert out.outputs[0].token_ids == _tokens(llm, [prompt])[0]
    assert llm.engine.kv.all_free()
