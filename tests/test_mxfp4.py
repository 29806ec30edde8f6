"""MXFP4 dequantization (gpt-oss experts) against gguf-py's numpy dequantizer (bit for bit, every exponent) and
transformers' own conversion of HF checkpoints."""
from __future__ import annotations

import numpy as np
import torch

from hearthlm.loader.mxfp4 import dequantize_gguf, dequantize_hf


def test_gguf_blocks_match_gguf_py_bit_for_bit():
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (512, 17), generator=g, dtype=torch.uint8)
    raw[:256, 0] = torch.arange(256, dtype=torch.uint8)  # every exponent, subnormal and huge ones included
    want = quants.dequantize(raw.numpy().reshape(1, -1), GGMLQuantizationType.MXFP4).reshape(512, 32)
    got = dequantize_gguf(raw).numpy()
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


def test_gguf_round_trip_of_quantized_values():
    from gguf import GGMLQuantizationType, quants

    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    q = quants.quantize(x, GGMLQuantizationType.MXFP4)
    got = dequantize_gguf(torch.from_numpy(q.reshape(-1, 17).copy())).reshape(8, 64)
    assert torch.equal(got, torch.from_numpy(quants.dequantize(q, GGMLQuantizationType.MXFP4)))
    assert float((got - torch.from_numpy(x)).abs().max()) < 1.0  # an FP4 grid: close, not exact


def test_hf_blocks_match_transformers_conversion():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=g, dtype=torch.uint8)  # [E, out, in / 32, 16]
    scales = torch.randint(110, 140, (3, 10, 4), generator=g, dtype=torch.uint8)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]: HF's parameter layout
    got = dequantize_hf(blocks, scales)
    assert got.shape == (3, 10, 128)
    assert torch.equal(got, want.transpose(1, 2))
