"""Mixture-of-experts families (Qwen3-MoE, Mixtral) against HF transformers on tiny random float32 models: greedy
tokens equal and logprobs close, through chunked prefill, batching and a prefix-cache hit; the config's counts."""
from __future__ import annotations

import pytest
import torch

from hearthlm import LLM, SamplingParams

from .conftest import prompts_of

VOCAB = 49152


def _tiny(kind: str, root, tokenizer):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                                          num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1,
                                          mlp_only_layers=[1], norm_topk_prob=True)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        cfg = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
        cls = transformers.MixtralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights than the init's: routing and tokens vary
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    path = root / kind
    model.save_pretrained(path)
    tokenizer.save(path)
    return model, path


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_moe_matches_hf(kind, tmp_path, default_tokenizer):
    hf, path = _tiny(kind, tmp_path, default_tokenizer)
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=32)
    cfg = llm.engine.model_config
    assert cfg.num_experts == (6 if kind == "qwen3_moe" else 4) and cfg.num_experts_per_tok == 2
    assert cfg.dense_layers == ([1] if kind == "qwen3_moe" else [])
    assert cfg.active_params < cfg.num_params
    prompts = prompts_of(4, [40, 7, 19, 3], seed=11)
    prompts.append(prompts[0][:35] + [5, 6])  # a prefix-cache hit on the first
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            lp = hf(torch.tensor([p + want])).logits[0, len(p) - 1:-1].float().log_softmax(-1)
        assert o.outputs[0].token_ids == want
        got = torch.tensor([next(iter(d.values())) for d in o.outputs[0].logprobs])
        torch.testing.assert_close(got, lp[torch.arange(10), torch.tensor(want)], atol=1e-4, rtol=1e-4)
    assert outs[-1].num_cached_tokens >= 32
    assert len(set(tuple(o.outputs[0].token_ids) for o in outs)) > 2  # the routing varied the answers


def test_moe_param_counts():
    from hearthlm.loader.hf_config import config_from_hf_dict

    d = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
         "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
         "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
         "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
         "tie_word_embeddings": False}
    cfg = config_from_hf_dict(d)  # Qwen3-30B-A3B: 30.5B in all, 3.3B active
    assert 30.0e9 < cfg.num_params < 31.0e9 and 3.2e9 < cfg.active_params < 3.4e9
    with pytest.raises(Exception, match="num_experts_per_tok"):
        config_from_hf_dict({**d, "num_experts_per_tok": 200})
