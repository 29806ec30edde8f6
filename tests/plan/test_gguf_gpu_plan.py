"""GGUF on a CUDA device (the bf16 copy or the kernels' repacked codes) and on the CPU (the int4 kernel's layout
plus bf16 copies): the plan counts what the loader will hold."""
from __future__ import annotations

import argparse

import torch

from hearthlm.plan.sources import gpu_tensor_bytes, resolve_model

from ..conftest import needs_default_model


def test_gpu_tensor_bytes_by_type():
    assert gpu_tensor_bytes("Q4_K", (4096, 4096)) == 4096 * 4096 * 5 // 8  # 4-bit codes + fp16 scale, min per 32
    assert gpu_tensor_bytes("Q6_K", (4096, 4096)) == 4096 * 4096 * 9 // 8  # one byte a code + fp16 scale per 16
    assert gpu_tensor_bytes("Q8_0", (64, 64)) == 64 * 64 * 17 // 16
    assert gpu_tensor_bytes("F32", (4096,)) == 2 * 4096  # norms: bf16
    assert gpu_tensor_bytes("Q3_K", (256, 256)) == 2 * 256 * 256  # no GPU kernel layout: dequantized
    from hearthlm.layers.quant_linear import GPU_QUANT_TYPES
    from hearthlm.plan.sources import _GPU_BYTES_PER_WEIGHT

    assert set(_GPU_BYTES_PER_WEIGHT) == set(GPU_QUANT_TYPES)  # one entry per type the loader keeps quantized


@needs_default_model
def test_default_model_gpu_bytes_match_a_hand_calculation():
    # SmolLM2-135M Q4_1: 30 blocks x 7 Q4_1 matrices (576x576 q/o, 192x576 k/v, 1536x576 gate/up/down), a tied
    # Q8_0 embedding 49,152 x 576, 61 f32 norms of 576
    src = resolve_model("smollm2")
    matrices = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
    embedding = 49152 * 576
    norms = 61 * 576
    assert src.gpu_weights["dense"].total_bytes == 2 * (matrices + embedding + norms) == 2 * 134_515_008
    assert src.gpu_weights["quantized"].total_bytes == matrices * 5 // 8 + embedding * 17 // 16 + 2 * norms
    assert len(src.gpu_weights["quantized"].layer_bytes) == 30


@needs_default_model
def test_plan_picks_the_copy_the_loader_would_make(capsys, monkeypatch):
    from hearthlm.cli.plan_cmd import build_plan
    from hearthlm.plan import preflight as pf

    src = resolve_model("smollm2")

    def plan(device: str):
        args = argparse.Namespace(model="smollm2", device=device, ctx="2048", concurrency=1)
        return build_plan(args)[1]

    big, small = plan("h100"), plan("0.3")  # 0.27 GB bf16 copy: fits 60% of 80 GiB, not of 0.3 GiB
    assert big.weights_bytes == src.gpu_weights["dense"].total_bytes
    assert any("dequantized to bf16" in w for w in big.warnings)
    assert small.weights_bytes == src.gpu_weights["quantized"].total_bytes
    assert any("kept quantized" in w for w in small.warnings)
    assert plan("cpu").weights_bytes == src.cpu_weights()[0].total_bytes  # CPU: the int4 kernel's layout
    # the engine's start-up plan asks the loader's rule with the free memory it sees
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (200 << 20, 1 << 30))
    assert pf.planned_weights(src.cfg, src, "cuda", "bfloat16") is src.gpu_weights["quantized"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))
    assert pf.planned_weights(src.cfg, src, "cuda", "bfloat16") is src.gpu_weights["dense"]


def test_cpu_plan_counts_what_the_engine_holds():
    """GGUF on the CPU: the int4 (or native) kernel's repacked blocks, the embedding kept for lookups and packed
    again as the tied head, float32 norms, plus the bf16 copies for batched decode; by hand for the default model,
    and equal to the loaded engine's tensors."""
    from hearthlm.layers import quant_linear as ql
    from hearthlm.loader.load import load_model

    from hearthlm.kernels.cpu_quant import library

    src = resolve_model("smollm2")
    blocks, embedding, norms = 30 * 3_538_944, 49152 * 576, 30 * 2 * 576 + 576
    held = blocks * 20 // 32 + embedding * 5 // 4 + embedding * 5 // 4 + 4 * norms  # Q4_1 0.625 B, Q8_0 1.25 B x2
    copies = 2 * (blocks + embedding)
    assert held == 137_274_624 and copies == 268_959_744
    native = library() is not None
    if native:  # the native kernel's tied head: Q8_0 codes a byte each + fp16 scale and min; no bf16 copies
        held -= embedding * 5 // 4 - embedding * 9 // 8
        copies = 0
    assert src.cpu_weights(0) == (src.cpu_weights(0)[0], 0) and src.cpu_weights(0)[0].total_bytes == held
    assert src.cpu_weights(1 << 30)[1] == copies and src.cpu_weights(1 << 30)[0].total_bytes == held + copies
    # a budget that stops part-way: whole matrices in load order (blocks first), as Int4Weight allocates them
    part = src.cpu_weights(100 << 20)[1]
    assert part == 0 if native else 99 << 20 < part <= 100 << 20
    from hearthlm.layers.linear import Linear

    net = load_model("smollm2", device="cpu").model  # its own cpu_dense_memory budget (the default)
    lins = [net.lm_head] + [v for layer in net.layers for v in vars(layer).values() if isinstance(v, Linear)]
    copies_held = sum(getattr(lin.packed, "dense_nbytes", 0) for lin in lins)
    engine = sum(t.numel() * t.element_size() for t in net.weight_tensors()) + copies_held
    want, _ = src.cpu_weights(ql.dense_budget_bytes())
    assert engine == want.total_bytes


def test_cpu_plan_fuses_parts_as_linear_fused_does():
    """PyTorch int4 path: adjacent q/k/v parts of one code width (Q4_K beside Q4_0) are one matmul with one bf16
    copy, as Linear.fused builds them; a Q8_0 v after them is another: a budget that holds q+k's copy or v's, not both."""
    from hearthlm.plan.sources import cpu_gguf_weights

    typed = [("blk.0.attn_q.weight", "Q4_K", (64, 32)), ("blk.0.attn_k.weight", "Q4_0", (32, 32)),
             ("blk.0.attn_v.weight", "Q8_0", (32, 32))]
    qk, v = 2 * 96 * 32, 2 * 32 * 32
    assert cpu_gguf_weights(typed, tied=False, dense_budget=qk + v, native=False)[1] == qk + v
    assert cpu_gguf_weights(typed, tied=False, dense_budget=qk + v - 1, native=False)[1] == qk  # q+k, one copy
    assert cpu_gguf_weights(typed, tied=False, dense_budget=qk - 1, native=False)[1] == v  # q is fused with k
    assert cpu_gguf_weights(typed, tied=False, dense_budget=qk + v, native=True)[1] == 0  # native: no copies
