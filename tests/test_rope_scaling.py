"""RoPE scaling types against HF transformers on tiny random float32 models: YaRN (inverse frequencies and the
cos/sin attention factor), through the engine's prefill chunks and decode rows."""
from __future__ import annotations

import pytest
import torch

from hearthlm import LLM
from hearthlm.kernels.rope import rope_attention_factor, rope_inv_freq

from .conftest import assert_greedy_like_hf, prompts_of


@pytest.mark.parametrize("rs", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2,
     "mscale": 0.7, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "truncate": False,
     "attention_factor": 1.2},
])
def test_yarn_tables_match_hf(rs):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.Qwen2Config(hidden_size=128, num_attention_heads=2, max_position_embeddings=1024,
                                   rope_theta=150000.0, rope_scaling=dict(rs))
    want, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    assert torch.equal(rope_inv_freq(64, 150000.0, rs), want)
    assert rope_attention_factor(rs) == pytest.approx(factor, rel=1e-12)


def test_yarn_model_matches_hf(tmp_path, default_tokenizer):
    import transformers

    rs = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    cfg = transformers.Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_scaling=rs, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=False, initializer_range=0.25)  # peaked: RoPE matters
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    default_tokenizer.save(tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=32)
    assert llm.engine.model_config.rope_scaling["rope_type"] == "yarn"
    prompts = prompts_of(3, [70, 9, 40], seed=3)
    assert_greedy_like_hf(llm, hf, prompts, 8)

def test_yarn_survives_a_gguf_round_trip(tmp_path):
    """llama.cpp's YaRN keys (what hearth quantize writes) read back as the same scaling."""
    import gguf

    from hearthlm.config import ModelConfig
    from hearthlm.loader.gguf_header import GGUFFile
    from hearthlm.loader.hf_config import config_from_gguf_metadata
    from hearthlm.quant.sources import write_shape_metadata

    rs = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 32.0,
          "beta_slow": 1.0}
    cfg = ModelConfig("qwen3", 16, 8, 16, 1, 2, 2, 4, rope_scaling=rs, max_position_embeddings=131072)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "qwen3")
    write_shape_metadata(w, cfg)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(4.0)
    w.add_rope_scaling_orig_ctx_len(32768)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(16)])
    w.add_tensor("token_embd.weight", torch.zeros(16, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = config_from_gguf_metadata(dict(GGUFFile(tmp_path / "m.gguf").metadata))
    assert got.rope_scaling == rs


@pytest.mark.parametrize("factor,original", [(2.0, 32), (4.0, 2048)])
def test_dynamic_ntk_static_base_is_hf_at_the_scaled_length(factor, original):
    """Dynamic NTK: our base is fixed (vLLM's rule); it equals HF's at seq_len = factor * original."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=original,
                                   rope_theta=10000.0, rope_scaling={"rope_type": "dynamic", "factor": factor})
    want, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=int(factor * original))
    rs = {"rope_type": "dynamic", "factor": factor, "original_max_position_embeddings": original}
    assert torch.equal(rope_inv_freq(64, 10000.0, rs), want)
    assert rope_attention_factor(rs) == 1.0


def test_dynamic_ntk_prefill_matches_hf_at_the_scaled_length(tmp_path, default_tokenizer):
    """HF's per-forward base at a 32-token forward (factor * max_position_embeddings) equals our static one: its
    logits at position 30 are the next-token logits of our 31-token prompt."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                   rope_scaling={"rope_type": "dynamic", "factor": 2.0}, rope_theta=10000.0,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.25)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    default_tokenizer.save(tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", max_model_len=64, max_num_batched_tokens=64)
    assert llm.engine.model_config.rope_scaling["rope_type"] == "dynamic"
    from hearthlm import SamplingParams

    prompts = prompts_of(2, [31], seed=5)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    for p, o in zip(prompts, outs):
        with torch.no_grad():  # one forward of 32 tokens (any last one): HF's dynamic base at seq_len 32
            lp = hf(torch.tensor([p + [3]])).logits[0, -2].float().log_softmax(-1)
        assert o.outputs[0].token_ids == [int(lp.argmax())]
        got = next(iter(o.outputs[0].logprobs[0].values()))
        torch.testing.assert_close(torch.tensor(float(got)), lp.max(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("long", [False, True])
def test_longrope_tables_match_hf(long):
    """LongRoPE (Phi-3 'su'): short factors while the engine's context fits the original length, long beyond it
    (HF's choice at a sequence of that length), and the cos/sin attention factor from the length ratio."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    g = torch.Generator().manual_seed(1)
    rs = {"rope_type": "longrope", "short_factor": (1 + torch.rand(16, generator=g)).tolist(),
          "long_factor": (2 + 4 * torch.rand(16, generator=g)).tolist(), "original_max_position_embeddings": 64}
    cfg = transformers.Phi3Config(hidden_size=128, num_attention_heads=4, max_position_embeddings=256,
                                  original_max_position_embeddings=64, rope_theta=10000.0, rope_scaling=dict(rs))
    want, factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=200 if long else 64)
    ours = dict(rs, max_position_embeddings=256, max_model_len=200 if long else 64)
    assert torch.equal(rope_inv_freq(32, 10000.0, ours), want)
    assert rope_attention_factor(ours) == pytest.approx(factor, rel=1e-12)
    assert factor != 1.0
