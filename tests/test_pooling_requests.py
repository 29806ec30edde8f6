"""Embeddings requests in the scheduler (LLMEngine.add_pooling_request): batched beside generation, chunked,
preempted and aborted like any sequence; every token's final hidden state matches HF transformers, and neither
kind of request changes the other's result."""
from __future__ import annotations

import pytest
import torch

from hearthlm import SamplingParams
from hearthlm.errors import InvalidRequestError

from .conftest import prompts_of

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _run(eng, gen: dict, pool: dict, all_rows: bool = True) -> tuple[dict, dict]:
    for rid, p in gen.items():
        eng.add_request(p, GREEDY, rid)
    for rid, p in pool.items():
        eng.add_pooling_request(p, all_rows, rid)
    tokens, states = {}, {}
    while eng.has_unfinished():
        for out in eng.step(emit_unfinished=False):
            assert out.error is None, out.error
            if out.hidden_states is not None:
                states[out.request_id] = out.hidden_states
            else:
                tokens[out.request_id] = out.outputs[0].token_ids
    return tokens, states


def _hf_states(tiny, ids: list[int]) -> torch.Tensor:
    tiny.path("llama")
    with torch.no_grad():
        return tiny.hf["llama"](torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].float()


def test_pooling_beside_generation_under_preemption_and_chunking(tiny, engine_for):
    llm = engine_for("llama", num_kv_blocks=12, max_num_seqs=8, max_num_batched_tokens=48)
    eng = llm.engine
    gen = dict(zip("abcd", prompts_of(4, [20, 35, 12, 30], seed=3)))
    pool = {f"e{i}": p for i, p in enumerate(prompts_of(4, [70, 5, 41, 1], seed=9))}
    before = eng.scheduler.num_preemptions
    tokens, states = _run(eng, gen, pool)
    assert eng.scheduler.num_preemptions > before, "the pool was meant to be small enough to preempt"
    for rid, p in gen.items():
        assert tokens[rid] == tiny.reference("llama", p, 16)
    for rid, p in pool.items():
        assert states[rid].shape == (len(p), 64)
        torch.testing.assert_close(states[rid], _hf_states(tiny, p), rtol=1e-4, atol=1e-4)
    # alone: float32 torch matmuls may round differently by row count (the native kernel's paths do not)
    alone = _run(eng, {}, {"x": pool["e0"]})[1]["x"]
    torch.testing.assert_close(alone, states["e0"], rtol=1e-5, atol=1e-5)
    last = _run(eng, {}, {"y": pool["e2"]}, all_rows=False)[1]["y"]
    assert last.shape == (1, 64)
    torch.testing.assert_close(last[0], states["e2"][-1], rtol=1e-5, atol=1e-5)
    assert eng.kv.all_free()


def test_last_token_pooling_uses_the_prefix_cache(tiny, engine_for):
    llm = engine_for("llama", max_num_batched_tokens=64)
    eng = llm.engine
    p = prompts_of(1, [70], seed=4)[0]
    first = _run(eng, {}, {"a": p}, all_rows=False)[1]["a"]
    eng.add_pooling_request(p, False, "b")
    out = [o for _ in range(4) for o in eng.step(emit_unfinished=False)]
    assert out and out[0].num_cached_tokens >= 48
    torch.testing.assert_close(out[0].hidden_states, first, rtol=1e-5, atol=1e-5)


def test_bad_pooling_requests_and_abort(engine_for):
    eng = engine_for("llama", max_num_batched_tokens=64).engine
    with pytest.raises(InvalidRequestError, match="no tokens"):
        eng.add_pooling_request([], True)
    with pytest.raises(InvalidRequestError, match=r"\[0, 49152\)"):
        eng.add_pooling_request([5, 49152], True)
    with pytest.raises(InvalidRequestError, match="longer than the model's limit"):
        eng.add_pooling_request([5] * (eng.max_model_len + 1), True)
    eng.add_pooling_request(prompts_of(1, [100], seed=1)[0], True, "z")
    eng.step()  # one chunk computed
    assert eng.abort_request("z").finished
    assert not eng.has_unfinished() and eng.kv.all_free()
