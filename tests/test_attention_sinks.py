"""Attention sinks (gpt-oss: a learned logit per head that joins the softmax with a zero value) through the
engine's torch paths, against HF transformers' eager sink attention on the same weights: prefill chunks, decode
rows and prefix-cache hits alike. The native kernel and the Triton kernels have their own tests
(tests/kernels/test_cpu_quant.py, tests/kernels/test_triton_interpreted.py)."""
from __future__ import annotations

import torch

from hearthlm import LLM

from .conftest import assert_greedy_like_hf, prompts_of


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
    outs = assert_greedy_like_hf(llm, hf, prompts, 8)
    assert outs[-1].num_cached_tokens >= 32
