"""Overlapped stepping (step N+1 launched before step N's tokens are read) must not change any output.

CUDA turns it on by default; here it is forced on the CPU, where the same engine logic runs (pending
tokens fed from the device-side buffer, finishes discovered one step late, preemption, aborts)."""
from __future__ import annotations

from hearthlm import SamplingParams

from .conftest import prompts_of


def _tokens(outs):
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


def test_async_equals_sync_with_preemption_stops_and_sampling(engine_for):
    sync = engine_for("llama")
    fast = engine_for("llama", async_scheduling=True, num_kv_blocks=16, max_num_seqs=8)
    assert fast.engine.runner.can_overlap and not sync.engine.runner.can_overlap
    prompts = prompts_of(8, [30, 45, 22, 40], seed=5)
    greedy = sync.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    sps = []
    for i, o in enumerate(greedy):
        ids = o.outputs[0].token_ids
        if i % 3 == 0:  # stop token that greedy decoding reaches mid-way: found one step late
            sps.append(SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[ids[7 + i]], ignore_eos=True))
        elif i % 3 == 1:
            sps.append(SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=10 + 3 * i, ignore_eos=True))
        else:
            sps.append(SamplingParams(temperature=0, max_tokens=1 + 4 * i, ignore_eos=True))
    before = fast.engine.scheduler.num_preemptions
    a = fast.generate(prompts, sps, use_tqdm=False)
    assert fast.engine.scheduler.num_preemptions > before
    b = sync.generate(prompts, sps, use_tqdm=False)
    assert _tokens(a) == _tokens(b)
    assert all(o.outputs[0].finish_reason == "stop" for o in a[::3])


def test_async_n_siblings_and_host_sampling(engine_for):
    sync = engine_for("llama")
    fast = engine_for("llama", async_scheduling=True)
    prompts = prompts_of(3, [17, 9], seed=6)
    sps = [SamplingParams(temperature=0.7, n=2, seed=4, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0, logprobs=2, max_tokens=9, ignore_eos=True),  # host sampling
           SamplingParams(temperature=0.9, repetition_penalty=1.3, seed=2, max_tokens=11, ignore_eos=True)]
    a, b = fast.generate(prompts, sps, use_tqdm=False), sync.generate(prompts, sps, use_tqdm=False)
    for x, y in zip(a, b):
        assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]
    assert a[1].outputs[0].logprobs == b[1].outputs[0].logprobs


def test_async_abort_while_in_flight(engine_for):
    fast = engine_for("llama", async_scheduling=True)
    eng = fast.engine
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = prompts_of(3, [14], seed=7)
    ids = [eng.add_request(p, sp) for p in prompts]
    for _ in range(4):
        eng.step()
    assert eng._inflight is not None
    eng.abort_request(ids[1])
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert set(done) == {ids[0], ids[2]}
    ref = engine_for("llama").generate([prompts[0]], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert done[ids[0]] == ref and len(done[ids[2]]) == 20
