"""One request's failure in sampling or stop handling fails that request alone; the batch goes on unchanged."""
from __future__ import annotations

import asyncio

import pytest

from hearthlm import SamplingParams
from hearthlm.engine.engine import LLMEngine, RequestFailedError
from hearthlm.errors import InvalidRequestError
from hearthlm.runtime import sampler

from .conftest import prompts_of

GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)


def _run(eng: LLMEngine, reqs: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (prompt, params) in reqs.items():
        eng.add_request(prompt, params, rid)
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.fixture(params=["sync", "overlap"])
def eng(request, engine_for) -> LLMEngine:
    if request.param == "sync":
        return engine_for("llama").engine
    return engine_for("llama", async_scheduling=True, max_num_seqs=8).engine


def _good(n: int = 4) -> dict[str, tuple[list[int], SamplingParams]]:
    prompts = prompts_of(n, [9, 17, 5, 23], seed=3)
    return {f"ok-{i}": (p, SamplingParams(**GREEDY)) for i, p in enumerate(prompts)}


def _reference(eng: LLMEngine) -> dict[str, list[int]]:
    return {rid: out.outputs[0].token_ids for rid, out in _run(eng, _good()).items()}


def _check(eng: LLMEngine, done: dict, ref: dict[str, list[int]], bad: str) -> Exception:
    assert {rid: done[rid].outputs[0].token_ids for rid in ref} == ref
    assert all(done[rid].error is None and done[rid].outputs[0].finish_reason == "length" for rid in ref)
    err = done[bad].error
    assert err is not None and done[bad].finished and eng.kv_capacity_tokens  # freed: no_block_leaks checks it
    assert not eng.requests and not eng.has_unfinished()
    return err


def test_stop_handling_failure_fails_one_request(eng, monkeypatch):
    ref = _reference(eng)
    real = LLMEngine._check_stop

    def check_stop(self, seq, state, token, stop_ids):
        if seq.request_id == "bad" and len(seq.output_ids) == 3:
            raise RuntimeError("detokenizer exploded")
        return real(self, seq, state, token, stop_ids)

    monkeypatch.setattr(LLMEngine, "_check_stop", check_stop)
    reqs = _good()
    reqs["bad"] = (prompts_of(1, [11], seed=9)[0], SamplingParams(**GREEDY))
    err = _check(eng, _run(eng, reqs), ref, "bad")
    assert isinstance(err, RequestFailedError) and err.http_status == 500
    assert "bad" in str(err) and "detokenizer exploded" in str(err)


def test_batched_sampling_failure_samples_rows_alone(eng, monkeypatch):
    ref = _reference(eng)
    real = sampler._sample_tokens

    def sample_tokens(logits, reqs, greedy=None):  # the "bad" row's parameters break any batch holding it
        if any(r.params.seed == 666 for r in reqs):
            raise OverflowError("Python int too large to convert to C long")
        return real(logits, reqs, greedy)

    monkeypatch.setattr(sampler, "_sample_tokens", sample_tokens)
    reqs = _good()
    reqs["bad"] = (prompts_of(1, [7], seed=8)[0], SamplingParams(temperature=1.0, seed=666, max_tokens=12))
    # a seeded sampling request that works must keep its tokens when a row beside it fails
    reqs["seeded"] = (prompts_of(1, [6], seed=4)[0], SamplingParams(temperature=0.9, seed=5, max_tokens=8))
    alone = _run(eng, {"seeded": reqs["seeded"]})["seeded"].outputs[0].token_ids
    done = _run(eng, reqs)
    err = _check(eng, done, ref, "bad")
    assert done["seeded"].outputs[0].token_ids == alone
    assert isinstance(err, RequestFailedError) and "OverflowError" in str(err)


def test_penalty_and_logprob_failures_fail_their_request(eng, monkeypatch):
    ref = _reference(eng)
    real_pen = sampler.apply_penalties

    def apply_penalties(logits, reqs):
        if any(r.params.repetition_penalty == 1.7 for r in reqs):
            raise InvalidRequestError("repetition_penalty 1.7 is cursed", param="repetition_penalty")
        return real_pen(logits, reqs)

    monkeypatch.setattr(sampler, "apply_penalties", apply_penalties)
    monkeypatch.setattr(sampler, "_logprobs", lambda lp, token, n: 1 / 0 if n == 3 else {token: 0.0})
    reqs = _good()
    reqs["bad"] = (prompts_of(1, [8], seed=1)[0], SamplingParams(**GREEDY, repetition_penalty=1.7))
    reqs["badlp"] = (prompts_of(1, [8], seed=2)[0], SamplingParams(**GREEDY, logprobs=3))
    reqs["lp"] = (prompts_of(1, [8], seed=2)[0], SamplingParams(**GREEDY, logprobs=1))
    done = _run(eng, reqs)
    err = _check(eng, done, ref, "bad")
    assert isinstance(err, InvalidRequestError) and err.http_status == 400  # the request's fault: 400
    assert isinstance(done["badlp"].error, RequestFailedError) and "ZeroDivisionError" in str(done["badlp"].error)
    assert done["lp"].error is None and len(done["lp"].outputs[0].logprobs) == 12


def test_vocab_checks_at_add_request(engine_for):
    eng = engine_for("llama").engine
    vocab = eng.model_config.vocab_size
    for kw, param in [(dict(top_k=vocab + 1), "top_k"), (dict(stop_token_ids=[vocab]), "stop_token_ids")]:
        with pytest.raises(InvalidRequestError, match=param) as e:
            eng.add_request([1, 2, 3], SamplingParams(**kw))
        assert e.value.param == param
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        eng.add_request([1, vocab], SamplingParams())
    assert not eng.requests


def test_async_engine_stream_raises_only_for_the_failing_request(engine_for, monkeypatch):
    from hearthlm.engine.async_engine import AsyncEngine

    llm = engine_for("llama", max_num_seqs=6)
    ref = _reference(llm.engine)
    real = LLMEngine._check_stop

    def check_stop(self, seq, state, token, stop_ids):
        if seq.request_id == "bad":
            raise KeyError("boom")
        return real(self, seq, state, token, stop_ids)

    monkeypatch.setattr(LLMEngine, "_check_stop", check_stop)
    reqs = _good()
    reqs["bad"] = (prompts_of(1, [11], seed=9)[0], SamplingParams(**GREEDY))

    async def main():
        aeng = AsyncEngine(llm.engine)
        try:
            async def one(rid, prompt, params):
                last = None
                async for out in aeng.generate(prompt, params, rid):
                    last = out
                return last.outputs[0].token_ids

            return await asyncio.gather(*(one(rid, *v) for rid, v in reqs.items()), return_exceptions=True)
        finally:
            aeng.shutdown()

    results = dict(zip(reqs, asyncio.run(main())))
    assert isinstance(results.pop("bad"), RequestFailedError)
    assert results == ref


def test_real_overflow_past_validation_fails_one_request(eng):
    """No monkeypatch of the engine: a top_k that torch cannot hold (set on the engine's own copy of the params,
    after validation) breaks only its own row."""
    ref = _reference(eng)
    reqs = _good()
    bad = SamplingParams(temperature=1.0, top_k=5, seed=1, max_tokens=12)
    reqs["bad"] = (prompts_of(1, [7], seed=8)[0], bad)
    for rid, (prompt, params) in reqs.items():
        eng.add_request(prompt, params, rid)
    held = eng.requests["bad"].params  # the engine resolves a copy: the caller's object stays as it was
    assert held is not bad and all(seq.params is held for seq in eng.requests["bad"].seqs)
    held.top_k = 10**20
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    err = _check(eng, done, ref, "bad")
    assert isinstance(err, RequestFailedError) and "sampling" in str(err)


def test_offline_api_raises_a_failed_request(engine_for, monkeypatch):
    """LLM.generate / LLM.stream raise the failed request's error instead of returning its partial text."""
    llm = engine_for("llama")
    real = LLMEngine._check_stop

    def check_stop(self, seq, state, token, stop_ids):
        if len(seq.output_ids) == 2 and seq.prompt_ids[0] == 7:
            raise RuntimeError("stop handling exploded")
        return real(self, seq, state, token, stop_ids)

    monkeypatch.setattr(LLMEngine, "_check_stop", check_stop)
    with pytest.raises(RequestFailedError, match="stop handling exploded"):
        llm.generate([[7, 8, 9], [10, 11, 12]], SamplingParams(**GREEDY), use_tqdm=False)
    with pytest.raises(RequestFailedError, match="stop handling exploded"):
        list(llm.stream([7, 8, 9], SamplingParams(**GREEDY)))
    assert len(llm.generate([[10, 11, 12]], SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].token_ids) == 12
    assert not llm.engine.requests
