"""The planner's formulas against hand calculations written out here."""
from __future__ import annotations

import pytest

from hearthlm.errors import InvalidRequestError
from hearthlm.loader.hf_config import config_from_hf_dict
from hearthlm.plan import memory as m
from hearthlm.plan.presets import preset_config

GiB = 1024**3


def gemma_like(layers: int = 4, window: int = 64):
    """A tiny Gemma-2-like config: even layers slide over `window` tokens, odd layers are global."""
    return config_from_hf_dict({
        "architectures": ["Gemma2ForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "sliding_window": window, "max_position_embeddings": 8192,
    })


def test_llama_3_1_8b_by_hand():
    cfg = preset_config("llama-3.1-8b")
    # 32 x (q 4096^2 + k,v 2*4096*1024 + o 4096^2 + mlp 3*4096*14336) + embed & head 2*128256*4096 + norms
    params = 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 2 * 128256 * 4096 + 65 * 4096
    assert params == cfg.num_params == 8_030_261_248
    assert int(m.weights_bytes(cfg, "bf16")) == pytest.approx(params * 2, rel=0.02)
    assert int(m.weights_bytes(cfg, "q8_0")) == pytest.approx(params * 34 / 32, rel=0.02)
    assert int(m.weights_bytes(cfg, "q4_k_m")) == pytest.approx(params * 4.85 / 8, rel=0.02)
    assert m.kv_bytes_per_token(cfg, "bf16") == 32 * 2 * 8 * 128 * 2 == 131_072
    assert m.kv_bytes_per_token(cfg, "fp8") == 65_536
    assert m.kv_bytes_per_token(cfg, "f32") == 262_144
    # one f32 scale per token and kv head for K and V, as the runner allocates (kernels/kv_quant.py)
    assert m.kv_scale_bytes_per_token(cfg, "int8") == m.kv_scale_bytes_per_token(cfg, "fp8") == 32 * 2 * 8 * 4
    assert m.kv_bytes_for_context(cfg, 131072, 16, "auto") == 131_072 * 131_072 * 16  # 256 GiB
    # T x 2 B x (2h + q + 2kv + 2I) + 16 sampled rows x vocab x 4 B
    assert m.activation_bytes(cfg, 2048, "bf16", 16) == 2048 * 2 * (8192 + 4096 + 2048 + 28672) + 16 * 128256 * 4


def test_qwen3_and_smollm2_by_hand():
    qwen = preset_config("qwen3-0.6b")
    # 28 x (q 1024*2048 + kv 2*1024*1024 + o 2048*1024 + mlp 3*1024*3072 + norms 2*1024 + qk-norm 2*128),
    # tied embedding 151936*1024, final norm 1024
    params = 28 * (1024 * 2048 * 2 + 2 * 1024 * 1024 + 3 * 1024 * 3072 + 2 * 1024 + 256) + 151936 * 1024 + 1024
    assert params == qwen.num_params
    assert int(m.weights_bytes(qwen, "bf16")) == pytest.approx(params * 2, rel=0.02)
    assert m.kv_bytes_per_token(qwen) == 28 * 2 * 8 * 128 * 2 == 114_688

    smol = preset_config("smollm2-135m")
    params = 30 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576) + 49152 * 576 + 576
    assert params == smol.num_params == 134_515_008
    assert int(m.weights_bytes(smol, "bf16")) == pytest.approx(params * 2, rel=0.02)
    assert m.kv_bytes_per_token(smol) == 30 * 2 * 3 * 64 * 2 == 23_040


def test_q4_1_estimate_matches_llama_cpp_layout():
    """llama.cpp's Q4_1: matrices 20 B / 32 weights, norms f32, tied embedding as output head in Q8_0
    (576 % 256 != 0 rules out Q6_K): the estimate equals the embedded GGUF's exact size."""
    smol = preset_config("smollm2-135m")
    matrices = 576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536
    expected = 30 * (matrices * 20 // 32 + 2 * 576 * 4) + 49152 * 576 * 34 // 32 + 576 * 4
    assert expected == 96_576_768
    assert int(m.weights_bytes(smol, "q4_1")) == expected


def test_weights_from_tensors_splits_blocks():
    w = m.weights_bytes_from_tensors([
        ("token_embd.weight", 1000), ("blk.0.attn_q.weight", 10), ("blk.0.ffn_down.weight", 5),
        ("blk.1.attn_q.weight", 7), ("output_norm.weight", 4), ("output.weight", 900),
    ])
    assert (w.embedding_bytes, w.lm_head_bytes, w.layer_bytes, w.other_bytes) == (1000, 900, [15, 7], 4)
    assert w.total_bytes == int(w) == 1926 and w.exact
    hf = m.weights_bytes_from_tensors([("model.embed_tokens.weight", 8), ("model.layers.0.mlp.up_proj.weight", 3),
                                       ("model.norm.weight", 1), ("lm_head.weight", 8)])
    assert (hf.embedding_bytes, hf.lm_head_bytes, hf.layer_bytes, hf.other_bytes) == (8, 8, [3], 1)


def test_sliding_window_layers_are_capped():
    cfg = gemma_like()
    assert cfg.layer_windows == [64, None, 64, None]
    per_layer_token = 2 * 2 * 16 * 2  # K and V x kv heads x head_dim x bf16
    # ctx 1000: sliding layers keep min(1000, 64 + 16) = 80 tokens (5 blocks); global layers 1008 (63 blocks)
    assert m.kv_tokens_per_layer(cfg, 1000) == [80, 1008, 80, 1008]
    assert m.kv_bytes_for_context(cfg, 1000, 1, "bf16") == per_layer_token * (2 * 80 + 2 * 1008)
    assert m.kv_bytes_for_context(cfg, 1000, 3, "bf16") == 3 * per_layer_token * (2 * 80 + 2 * 1008)
    # shorter than the window: nothing to cap, 50 tokens round up to 4 blocks of 16
    assert m.kv_bytes_for_context(cfg, 50, 1, "bf16") == per_layer_token * 4 * 64
    # the real Gemma-2-2B: 13 sliding layers (4096 + 16) and 13 global, 2 x 4 heads x 256 x 2 B = 4096 B each
    gemma = preset_config("gemma-2-2b")
    assert gemma.layer_windows[:2] == [4096, None]
    assert m.kv_bytes_for_context(gemma, 32768, 1, "auto") == 4096 * (13 * 4112 + 13 * 32768)
    assert m.kv_bytes_per_token(gemma) == 26 * 2 * 4 * 256 * 2


def test_verdicts_and_limits():
    cfg = preset_config("llama-3.1-8b")
    h100 = m.device_spec("h100")
    ok = m.make_plan(cfg, "bf16", 8192, 16, "auto", h100, 0.9)
    assert ok.verdict == "fits" and ok.ok and ok.gpu_layers == 32 and ok.slowdown == 1.0
    assert ok.total_bytes == ok.weights_bytes + ok.kv_bytes + ok.activation_bytes + ok.overhead_bytes
    assert ok.usable_bytes == int(80 * GiB * 0.9)

    spill = m.make_plan(cfg, "bf16", 131072, 16, "auto", h100, 0.9)
    assert spill.verdict == "kv_spills" and not spill.ok
    free = spill.usable_bytes - spill.weights_bytes - spill.overhead_bytes - spill.activation_bytes
    # KV per 131,072-token sequence is exactly 16 GiB (activations barely depend on concurrency)
    assert spill.max_concurrency == free // (16 * GiB) == 3
    # at 16 sequences: whole 16-token blocks of 16 x 131,072 B
    assert spill.max_context == free // (16 * 131072 * 16) * 16 == 28_848
    fp8 = m.make_plan(cfg, "bf16", 131072, 16, "fp8", h100, 0.9)
    # fp8: 65,536 B of codes + 2,048 B of scales per token
    assert fp8.max_concurrency == free // (131072 * (65_536 + 2_048)) == 6

    nope = m.make_plan(cfg, "bf16", 8192, 1, "auto", int(0.5 * GiB), 0.9)
    assert nope.verdict == "does_not_fit" and nope.max_context == nope.max_concurrency == 0


def test_partial_offload_picks_the_largest_gpu_layers():
    cfg = preset_config("llama-3.1-8b")
    device = m.DeviceSpec("8g", "gpu", 8 * GiB, 1e12)
    plan = m.make_plan(cfg, "bf16", 8192, 1, "auto", device, 0.9)
    w = m.weights_bytes(cfg, "bf16")
    layer, head = w.layer_bytes[0], w.head_bytes
    kv_layer = (8192 + 16) * 2 * 8 * 128 * 2  # a layer's pool: 512 blocks + the null block
    fixed = head + w.other_bytes + plan.activation_bytes + plan.overhead_bytes
    n = (plan.usable_bytes - fixed) // (layer + kv_layer)  # largest N with N x (block + its KV) + fixed <= usable
    assert plan.verdict == "partial_offload" and plan.gpu_layers == n == 12 and not plan.ok
    # slowdown = (W_gpu / 1 TB/s + W_cpu / 50 GB/s) / (W / 1 TB/s), W = blocks + head
    w_cpu, w_all = (32 - n) * layer, 32 * layer + head
    assert plan.slowdown == pytest.approx(((w_all - w_cpu) / 1e12 + w_cpu / 50e9) / (w_all / 1e12))
    assert plan.cpu_weight_read_fraction == pytest.approx(w_cpu / w_all)
    assert plan.host_bytes == w_cpu + w.embedding_bytes + (32 - n) * kv_layer
    # accepting offload makes it a runnable plan; an explicit N that fits too; one that does not, not
    assert m.make_plan(cfg, "bf16", 8192, 1, "auto", device, 0.9, gpu_layers="auto").ok
    assert m.make_plan(cfg, "bf16", 8192, 1, "auto", device, 0.9, gpu_layers=4).gpu_layers == 4
    too_many = m.make_plan(cfg, "bf16", 8192, 1, "auto", device, 0.9, gpu_layers=20)
    assert not too_many.ok and too_many.gpu_layers == 12
    # not enough RAM for the offloaded part: nothing fits
    assert m.make_plan(cfg, "bf16", 8192, 1, "auto", device, 0.9, host_bytes=GiB).verdict == "does_not_fit"


def test_devices_and_bad_input():
    assert m.device_spec("h100").memory_bytes == 80 * GiB
    assert m.device_spec("H200").bandwidth_bytes_per_s == 4.8e12
    assert m.device_spec("24").memory_bytes == 24 * GiB
    assert m.device_spec("cpu").kind == "cpu" and m.device_spec("cpu").memory_bytes > 0
    assert m.overhead_bytes("cpu") < m.overhead_bytes(m.device_spec("h100")) == 512 * 1024**2
    for bad in ("tpu", "-3"):
        with pytest.raises(InvalidRequestError):
            m.device_spec(bad)
    with pytest.raises(InvalidRequestError, match="choose one of"):
        m.weights_bytes(preset_config("qwen3-0.6b"), "q9_k")
    with pytest.raises(InvalidRequestError):
        m.kv_bytes_per_token(preset_config("qwen3-0.6b"), "fp4")
    assert m.normalize_quant("Q4_K_M") == "q4_k_m" and m.normalize_quant("fp16") == "f16"


def test_one_name_per_format():
    """The planner's int8/int4 are the engine's --quantization formats (groups of 32: 8.5 and 5.0 bits a weight);
    AWQ/GPTQ checkpoints have names of their own (issue 17)."""
    assert m.normalize_quant("int4") == "int4" and m.QUANT_BITS_PER_WEIGHT["int4"] == m.QUANT_BITS_PER_WEIGHT["q4_1"]
    assert m.QUANT_BITS_PER_WEIGHT["int8"] == m.QUANT_BITS_PER_WEIGHT["q8_0"]
    for name in ("awq", "GPTQ", "int4-awq-g128"):
        assert m.normalize_quant(name) == "int4-awq-g128"
    assert m.normalize_quant("Q4-K-M") == "q4_k_m" and m.normalize_quant("int4-g32") == "int4"
