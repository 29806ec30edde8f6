"""Phi-3 against HF transformers on tiny random float32 models: fused qkv / gate_up split at load time, LongRoPE
with the long factors (the engine's context exceeds the original length; prompts longer than it, where HF picks
the same factors), a sliding window on every layer."""
from __future__ import annotations

import pytest
import torch

from hearthlm import LLM

from .conftest import assert_greedy_like_hf, prompts_of


@pytest.fixture(scope="module", params=[1.0, 0.75], ids=["phi3", "phi4mini_partial_rotary"])
def phi3(request, tmp_path_factory, default_tokenizer):
    import transformers

    g = torch.Generator().manual_seed(2)
    n = int(16 * request.param) // 2  # head_dim 16
    rs = {"rope_type": "longrope", "short_factor": (1 + torch.rand(n, generator=g)).tolist(),
          "long_factor": (2 + 4 * torch.rand(n, generator=g)).tolist()}
    cfg = transformers.Phi3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  original_max_position_embeddings=48, rope_scaling=rs, rope_theta=10000.0,
                                  sliding_window=60, partial_rotary_factor=request.param, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.25)
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("phi3")
    hf.save_pretrained(path)
    default_tokenizer.save(path)
    return hf, path


def test_phi3_matches_hf(phi3):
    hf, path = phi3
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=32)
    cfg = llm.engine.model_config
    assert cfg.architecture == "phi3" and cfg.rope_scaling["rope_type"] == "longrope"
    assert cfg.layer_windows == [60, 60]
    assert_greedy_like_hf(llm, hf, prompts_of(3, [70, 52, 90], seed=4), 6)
