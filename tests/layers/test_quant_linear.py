"""GGUF weights kept quantized on CPU: unpacking is exact, kernels match dequantize-then-matmul, and the
default model's greedy output with quantized weights matches the dequantized run up to near-tie logits."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from hearthlm.layers.linear import Linear
from hearthlm.layers.quant_linear import Int4Weight, NativeWeight
from hearthlm.layers.weight_kernel import DenseWeight
from hearthlm.loader.gguf_unpack import unpack_gguf
from hearthlm.quant.group_quant import GroupQuant

from ..conftest import assert_diverges_only_at_near_ties, needs_default_model

# (type, K) incl. K not a multiple of 256 where the block allows it
CASES = [("Q4_0", 96), ("Q4_0", 576), ("Q4_1", 160), ("Q4_1", 576), ("Q8_0", 96), ("Q8_0", 576),
         ("Q5_0", 96), ("Q5_1", 160), ("Q4_K", 256), ("Q4_K", 768), ("Q5_K", 512)]


def random_blocks(type_name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random valid blocks [rows, bytes per row]: random codes, finite fp16 scales of either sign."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * k // block, size), dtype=np.uint8)
    for off in [0, 2] if type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0]:  # d (and m / dmin) come first
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, (len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def dequant_ref(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(shape).copy())


def close(y: torch.Tensor, ref: torch.Tensor, rel: float = 1e-2) -> None:
    """bf16 activations, scales and output: max error within `rel` of the output scale (~0.4% seen)."""
    err = float((y - ref).abs().max())
    assert err <= rel * float(ref.abs().max()) + 1e-4, f"max error {err:.3g} vs max |ref| {float(ref.abs().max()):.3g}"


@pytest.mark.parametrize("type_name,k", CASES)
def test_unpack_is_exact(type_name, k):
    raw = random_blocks(type_name, 32, k)
    g = unpack_gguf(raw, type_name, (32, k))
    assert torch.equal(g.dequantize(), dequant_ref(raw, type_name, (32, k)))
    if g.bits > 4:  # the two 4-bit halves sum to the same weights, exactly
        h = g.nibble_split().dequantize()
        assert torch.equal(h[:, :k] + h[:, k:], g.dequantize())


@pytest.mark.parametrize("type_name,k", CASES)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int4_kernel_matches_dequantize_then_matmul(type_name, k, rows, torch_int4):
    n = 48
    raw = random_blocks(type_name, n, k, seed=rows)
    lin = Linear(unpack_gguf(raw, type_name, (n, k)))
    assert isinstance(lin.packed, Int4Weight)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    close(lin(x), x @ dequant_ref(raw, type_name, (n, k)).T)


@pytest.mark.parametrize("type_name,k", CASES)
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_native_kernel_matches_dequantize_then_matmul(type_name, k, rows):
    """int8 activations (a scale per 16 inputs): within ~1% of the output scale; 40 rows: the dense copy if kept."""
    n = 48
    raw = random_blocks(type_name, n, k, seed=rows)
    lin = Linear(unpack_gguf(raw, type_name, (n, k)))
    if not isinstance(lin.packed, NativeWeight):
        pytest.skip("the native CPU kernel is not built here")
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    close(lin(x), x @ dequant_ref(raw, type_name, (n, k)).T, rel=2e-2)


def test_fused_permuted_bias_and_fallbacks(torch_int4):
    k = 64
    parts = [unpack_gguf(random_blocks("Q4_1", n, k, seed=n), "Q4_1", (n, k)) for n in (32, 16, 16)]
    dense = [p.dequantize() for p in parts]
    bias = [torch.randn(p.shape[0]) for p in parts]
    x = torch.randn(5, k)
    close(Linear.fused(parts, bias)(x), x @ torch.cat(dense).T + torch.cat(bias))
    perm = torch.randperm(32)
    assert torch.equal(parts[0][perm].dequantize(), dense[0][perm])
    # N % 16 != 0: no int4 layout, dequantized instead
    odd = unpack_gguf(random_blocks("Q4_0", 40, k), "Q4_0", (40, k))
    lin = Linear(odd)
    assert lin.packed is None and torch.equal(lin.weight, odd.dequantize())
    # mixed formats (a Q8_0 part, a dense part) run one matmul per part
    q8 = unpack_gguf(random_blocks("Q8_0", 16, k), "Q8_0", (16, k))
    mixed = Linear.fused([parts[1], q8, dense[2]], bias[1:] + bias[2:])
    assert [type(p) for p in mixed.parts] == [Int4Weight, Int4Weight, DenseWeight]
    close(mixed(x), x @ torch.cat([dense[1], q8.dequantize(), dense[2]]).T + torch.cat(bias[1:] + bias[2:]))
    # adjacent same-format weights (Q4_K q/k before a Q6_K v) still fuse: one matmul per run
    runs = Linear.fused([parts[1], parts[2], q8])
    assert [p.out_features for p in runs.parts] == [32, 16]
    close(runs(x), x @ torch.cat([dense[1], dense[2], q8.dequantize()]).T)
    # batch invariance within the int4 kernel: each row's result is the same alone or inside a batch of any size
    # (with a dense copy, calls from dense_min_rows rows on run the bf16 GEMM instead: tests/layers/test_cpu_decode.py)
    head = Linear(q8)
    int4_only = Int4Weight(q8, dense=False)
    x16 = torch.randn(16, k)
    assert torch.equal(int4_only(x16), torch.cat([int4_only(x16[i:i + 1]) for i in range(16)]))
    assert torch.equal(head(x16[:2]), torch.cat([head(x16[i:i + 1]) for i in range(2)]))
    close(head(x16), x16 @ q8.dequantize().T)
    ids = torch.tensor([3, 0, 15])
    assert torch.equal(q8.embedding(ids), torch.nn.functional.embedding(ids, q8.dequantize()))


def test_weights_option():
    from hearthlm.loader.load import keep_quantized

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert keep_quantized(None, "auto", cpu) and keep_quantized("auto", "bfloat16", cpu)
    assert not keep_quantized("dequantize", "auto", cpu)
    assert not keep_quantized(None, "float32", cpu)  # explicit fp32: the exact (HF-equal) path
    assert not keep_quantized(None, "auto", cuda)  # GPU: bf16 until the Triton quant kernels beat cuBLAS
    assert keep_quantized("quantized", "auto", cuda) and not keep_quantized("dequantize", "auto", cuda)
    with pytest.raises(ValueError):
        keep_quantized("int3", "auto", cpu)


@needs_default_model
def test_default_model_quantized_weights_match_gguf_dequantization():
    from hearthlm.loader import default_model_path
    from hearthlm.loader.gguf import GGUFWeights

    w = GGUFWeights(default_model_path())
    cfg = w.config()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight"):
        g = w.get_quantized(name, cfg, torch.float32)
        assert isinstance(g, GroupQuant) and torch.equal(g.dequantize(), w.get(name, cfg)), name
    assert w.get_quantized("model.norm.weight", cfg, torch.float32) is None


@needs_default_model
@pytest.mark.parametrize("kernel", ["native", "torch_int4"])
def test_default_model_greedy_matches_dequantized_or_diverges_at_a_near_tie(kernel, request):
    from hearthlm import LLM, SamplingParams

    kind = NativeWeight
    if kernel == "torch_int4":
        request.getfixturevalue("torch_int4")
        kind = Int4Weight
    quant = LLM(dtype="auto", device="cpu", max_model_len=256, max_num_seqs=4)
    ref = LLM(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4)
    m = quant.engine.runner.model
    if kind is NativeWeight and not isinstance(m.lm_head.packed, NativeWeight):
        pytest.skip("the native CPU kernel is not built here")
    assert all(isinstance(lin.packed, kind) for lin in (m.layers[0].qkv, m.layers[0].down, m.lm_head))
    assert m.layers[0].native == (kind is NativeWeight)
    assert ref.engine.runner.model.layers[0].qkv.packed is None
    prompts = ["The history of the printing press", "def fibonacci(n):", "Once upon a time, in a small village,"]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in quant.generate(prompts, sp, use_tqdm=False)]
    refs = [o.outputs[0].token_ids for o in ref.generate(prompts, sp, use_tqdm=False)]
    assert_diverges_only_at_near_ties(ref, prompts, ours, refs)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2"])
def test_tiny_families_quantized_logits_close_to_dequantized(tiny, tmp_path, family):
    """Bias (qwen2), q/k norms (qwen3), scaled tied embeddings and soft-capping (gemma2), Q8_0 kept quantized. The
    tiny random models amplify bf16 rounding, so the bar is the same model dequantized and run in bf16."""
    from hearthlm.quant import perplexity_llm, quantize_model, window_logits

    path = tmp_path / f"{family}-q8_0.gguf"
    quantize_model(Path(tiny.path(family)), "q8_0", path)
    ids = list(range(100, 130))

    def logits(dtype: str, weights: str | None = None) -> torch.Tensor:
        llm = perplexity_llm(str(path), len(ids), dtype=dtype, weights=weights)
        if dtype == "auto":
            assert any(isinstance(lin.packed, (NativeWeight, Int4Weight))
                       for lin in vars(llm.engine.runner.model.layers[0]).values() if isinstance(lin, Linear))
        return window_logits(llm, [ids])[0].float()

    ref, quant = logits("float32"), logits("auto")
    bf16 = logits("bfloat16", "dequantize")
    err, bf16_err = (quant - ref).abs().max(), (bf16 - ref).abs().max()
    assert err <= max(1.5 * bf16_err, 1e-2 * ref.abs().max()), f"{err:.3g} vs bf16 dequantized {bf16_err:.3g}"
