"""Attention sinks (gpt-oss: a learned logit per head that joins the softmax with a zero value) through the
engine's torch paths, against HF transformers' eager sink attention on the same weights: prefill chunks, decode
rows and prefix-cache hits alike. The native kernel and the Triton kernels have their own tests
(tests/kernels/test_cpu_quant.py, tests/kernels/test_triton_interpreted.py)."""
from __future__ import annotations

import torch

from hearthlm import LLM, SamplingParams

from .conftest import prompts_of


def test_sinks_match_hf_eager_sink_attention(tiny, monkeypatch):
    import transformers.models.llama.modeling_llama as ml
    from transformers import LlamaForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as sink_attention

    path = tiny.path("llama")
    hf = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    heads = hf.config.num_attention_heads
    sinks = [torch.randn(heads, generator=g) * 2 for _ in hf.model.layers]
    for layer, s in zip(hf.model.layers, sinks):
        layer.self_attn.sinks = torch.nn.Parameter(s.clone())
    monkeypatch.setattr(ml, "eager_attention_forward", sink_attention)
    llm = LLM(model=path, dtype="float32", device="cpu", max_num_batched_tokens=16, max_model_len=128)
    for layer, s in zip(llm.engine.runner.model.layers, sinks):
        layer.sinks = s.clone()
    prompts = prompts_of(4, [23, 5, 40, 12], seed=7)
    prompts.append(prompts[2][:33] + [9, 9])  # a prefix-cache hit on the third
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            logits = hf(torch.tensor([p + want])).logits[0, len(p) - 1:-1].float().log_softmax(-1)
        assert o.outputs[0].token_ids == want
        got = torch.tensor([next(iter(d.values())) for d in o.outputs[0].logprobs])
        torch.testing.assert_close(got, logits[torch.arange(8), torch.tensor(want)], atol=1e-4, rtol=1e-4)
    assert outs[-1].num_cached_tokens >= 32
