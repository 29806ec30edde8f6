"""Offline API behaviour: stop strings, streaming, context limits, bad input, aborts."""
from __future__ import annotations

import pytest

from hearthlm import SamplingParams
from hearthlm.errors import CapacityError, ContextLengthError, InvalidRequestError

from .conftest import needs_default_model, prompts_of


@pytest.fixture(scope="module")
def smol():
    from hearthlm import LLM

    from .conftest import _engines

    key = ("smol-api",)
    if key not in _engines:
        _engines[key] = LLM(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=8)
    return _engines[key]


@needs_default_model
def test_stop_strings_cut_across_token_boundaries(smol):
    base = smol.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    text = base.text
    assert len(text) > 12
    # a stop string that starts inside one token and ends inside a later one
    stop = text[5:11]
    out = smol.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[0]
    o = out.outputs[0]
    assert o.text == text[:5] and o.finish_reason == "stop" and o.stop_reason == stop
    inc = smol.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=40, stop=[stop],
                                                                    include_stop_str_in_output=True))[0]
    assert inc.outputs[0].text == text[:11]
    # streaming never leaks any part of the stop string
    streamed = "".join(smol.stream("The capital of France is", SamplingParams(temperature=0, max_tokens=40,
                                                                              stop=[stop])))
    assert streamed == text[:5]


@needs_default_model
def test_stream_equals_generate(smol):
    sp = SamplingParams(temperature=0, max_tokens=30)
    full = smol.generate(["Tell me about dogs."], sp)[0].outputs[0].text
    assert "".join(smol.stream("Tell me about dogs.", sp)) == full


@needs_default_model
def test_chat_uses_template_and_stops_at_eos(smol):
    out = smol.chat([{"role": "user", "content": "What is 2+2? Answer with a number."}],
                    SamplingParams(temperature=0, max_tokens=30))[0]
    o = out.outputs[0]
    assert o.finish_reason == "stop" and "4" in o.text
    assert o.token_ids[-1] in smol.tokenizer.eos_token_ids and "<|im_end|>" not in o.text


@needs_default_model
def test_context_length_error_names_numbers_and_options(smol):
    prompt = "word " * 300
    with pytest.raises(ContextLengthError) as e:
        smol.generate([prompt], SamplingParams(max_tokens=10))
    msg = str(e.value)
    assert "max_model_len is 256" in msg and "truncate='left'" in msg and "--max-model-len" in msg


@needs_default_model
def test_truncate_left_keeps_system_prompt_and_reports(smol):
    messages = [{"role": "system", "content": "You are a pirate."}]
    for i in range(12):
        messages += [{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
                     {"role": "assistant", "content": f"It is {2 * i}, matey."}]
    messages.append({"role": "user", "content": "Last question: say hello."})
    sp = SamplingParams(temperature=0, max_tokens=16, truncate="left")
    out = smol.chat(messages, sp)[0]
    assert out.truncated_tokens > 0
    assert len(out.prompt_token_ids) + 16 <= 256
    prompt_text = smol.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert "You are a pirate." in prompt_text and "Last question" in prompt_text and "Question number 0" not in prompt_text
    with pytest.raises(ContextLengthError):
        smol.chat(messages, SamplingParams(temperature=0, max_tokens=16))


def test_raw_truncate_left_drops_oldest_tokens(engine_for):
    llm = engine_for("llama", max_model_len=64)
    prompt = list(range(10, 110))
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, truncate="left", ignore_eos=True))[0]
    assert out.prompt_token_ids == prompt[-56:] and out.truncated_tokens == 44


def test_bad_prompts_raise_and_engine_keeps_serving(engine_for, tiny):
    llm = engine_for("llama")
    cases = [("", "empty"), ([], "non-empty"), ([1, 2, 10**9], "outside the vocabulary"), ([-1], "outside"),
             ([1.5], "outside")]
    for prompt, match in cases:
        with pytest.raises(InvalidRequestError, match=match):
            llm.generate([prompt], SamplingParams(max_tokens=4))
    # one bad prompt in a list rejects the call without leaving the good ones queued
    with pytest.raises(InvalidRequestError):
        llm.generate([[5, 6, 7], ""], SamplingParams(max_tokens=4))
    p = prompts_of(1, [9], seed=12)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == tiny.reference("llama", p)


def test_unknown_model_path_is_actionable(tmp_path):
    from hearthlm import LLM
    from hearthlm.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="not found .*`hearth list`"):
        LLM(model=str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="hearth pull no-such-model"):  # a store name: offer the pull
        LLM(model="no-such-model")


def test_request_larger_than_pool_is_rejected(engine_for):
    llm = engine_for("llama", num_kv_blocks=24, max_num_seqs=8)
    with pytest.raises(CapacityError, match="KV cache"):
        llm.generate([list(range(5, 300))], SamplingParams(max_tokens=200))


def test_abort_frees_blocks_immediately_and_others_continue(engine_for, tiny):
    llm = engine_for("llama")
    eng = llm.engine
    prompts = prompts_of(3, [30, 40, 50], seed=13)
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ids = [eng.add_request(p, sp) for p in prompts]
    for _ in range(5):
        eng.step()
    used = eng.kv.usage
    out = eng.abort_request(ids[1])
    assert out.outputs[0].finish_reason == "abort" and eng.kv.usage < used
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert set(done) == {ids[0], ids[2]}
    assert done[ids[0]].outputs[0].token_ids == tiny.reference("llama", prompts[0])
    assert done[ids[2]].outputs[0].token_ids == tiny.reference("llama", prompts[2])
    assert eng.kv.all_free()


def test_abort_during_chunked_prefill_and_preemption_leaves_no_leak(engine_for):
    llm = engine_for("llama", num_kv_blocks=24, max_num_seqs=8)
    eng = llm.engine
    prompts = prompts_of(8, [20, 35, 12, 30], seed=14)
    ids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)) for p in prompts]
    for i in range(40):
        eng.step()
        if i % 7 == 3:
            eng.abort_request(ids[i % 8])
    for rid in ids:
        eng.abort_request(rid)
    assert not eng.has_unfinished() and eng.kv.all_free()


@needs_default_model
def test_stop_strings_wait_for_min_tokens(smol):
    base = smol.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    stop = base.text[2:6]
    out = smol.generate(["The capital of France is"],
                        SamplingParams(temperature=0, max_tokens=24, stop=[stop], min_tokens=12))[0].outputs[0]
    assert len(out.token_ids) >= 12
    assert out.text.startswith(base.text[:6])  # the early occurrence was not cut
