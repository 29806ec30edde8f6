"""The engine never mutates the caller's objects: a SamplingParams shared by several prompts, or the configs it
was built from, are unchanged afterwards, and each prompt resolves its own max_tokens budget."""
from __future__ import annotations

import copy

from hearthlm import SamplingParams
from hearthlm.config import CacheConfig, EngineConfig, SchedulerConfig
from hearthlm.engine.engine import LLMEngine

MAX_MODEL_LEN = 48


def test_shared_sampling_params_unchanged_and_budget_per_prompt(engine_for):
    llm = engine_for("llama", max_model_len=MAX_MODEL_LEN)
    shared = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, stop=["never"], stop_token_ids=[7])
    before = copy.deepcopy(shared)
    prompts = [[5] * 20, [6] * 36, [9] * 44]  # the first prompt's budget (28 tokens) would overflow the others
    outs = llm.generate(prompts, shared, use_tqdm=False)
    assert shared == before and shared.max_tokens is None
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        assert c.finish_reason == "length" or c.stop_reason == 7, c
        if c.finish_reason == "length":
            assert len(c.token_ids) == MAX_MODEL_LEN - len(prompt)
    # chat and stream resolve in copies too
    llm.chat([{"role": "user", "content": "hi"}], shared, use_tqdm=False)
    list(llm.stream([5] * 44, shared))
    assert shared == before


def test_request_params_are_the_engines_own(engine_for):
    llm = engine_for("llama", max_model_len=MAX_MODEL_LEN)
    params = SamplingParams(temperature=0, max_tokens=None, stop=["x"])
    rid = llm.engine.add_request([5] * 8, params)
    own = llm.engine.requests[rid].params
    try:
        assert own is not params and own.stop is not params.stop and own.max_tokens == MAX_MODEL_LEN - 8
        params.stop.append("y")  # a later change by the caller does not reach the running request
        assert own.stop == ["x"]
    finally:
        llm.engine.abort_request(rid)


def test_engine_config_unchanged(tiny):
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=1 << 20,
                            enable_chunked_prefill=False)
    config = EngineConfig(model=tiny.path("llama"), dtype="float32", device="cpu", cache=CacheConfig(num_blocks=80),
                          scheduler=sched)
    before = copy.deepcopy(config)
    engine = LLMEngine(config)
    assert config == before and config.scheduler is sched and sched.max_model_len == 1 << 20
    # the engine's own copy holds the resolved limits
    assert engine.max_model_len == 1024 and engine.config.scheduler.max_num_batched_tokens == 1024
