"""GGUF: the embedded default model against HF transformers, dequantization, bad files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hearthlm import SamplingParams
from hearthlm.errors import ModelLoadError

from .conftest import needs_default_model


@pytest.fixture(scope="session")
def hf_default():
    from transformers import AutoModelForCausalLM

    from hearthlm.loader import default_model_path

    p = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()


@needs_default_model
def test_default_model_loads_fast_and_matches_hf(default_llm, hf_default):
    tok = default_llm.tokenizer
    prompts = ["The history of the printing press", "def fibonacci(n):"]
    prompts.append(tok.apply_chat_template([{"role": "user", "content": "Name three colours."}]))
    outs = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = out.prompt_token_ids
        with torch.no_grad():
            ref = hf_default.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=48, min_new_tokens=48,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref, prompt


@needs_default_model
def test_default_model_logits_close_to_hf(default_llm, hf_default):
    ids = default_llm.tokenizer.encode("Paged attention stores keys and values in blocks")
    out = default_llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_default(torch.tensor([ids])).logits[0, -1].float(), -1)
    for t, lp in out.outputs[0].logprobs[0].items():
        assert abs(lp - float(ref[t])) < 1e-3


def _random_blocks(qtype, n_blocks: int, rng) -> np.ndarray:
    """Random but valid quantized blocks (finite fp16 scales)."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scale_offsets = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
                     "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [type_size - 2], "Q2_K": [type_size - 4, type_size - 2],
                     "Q3_K": [type_size - 2]}[qtype.name]
    for off in scale_offsets:
        raw[:, off:off + 2] = np.frombuffer(rng.uniform(-1, 1, n_blocks).astype(np.float16).tobytes(),
                                            dtype=np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_dequant_matches_independent_implementation(name):
    """Our dequant (gguf's vectorised numpy) agrees with transformers' independent torch implementation."""
    import gguf
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    qtype = gguf.GGMLQuantizationType[name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = _random_blocks(qtype, 64, np.random.default_rng(0))
    ours = gguf.quants.dequantize(raw, qtype).reshape(-1)
    theirs = hf_dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype)).reshape(-1).numpy()
    assert ours.shape == theirs.shape == (64 * block_size,)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_float_types_roundtrip():
    import gguf

    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    for qtype, tol in [(gguf.GGMLQuantizationType.F32, 0), (gguf.GGMLQuantizationType.F16, 1e-3),
                       (gguf.GGMLQuantizationType.BF16, 1e-2)]:
        data = gguf.quants.quantize(x, qtype) if qtype != gguf.GGMLQuantizationType.F16 else x.astype(np.float16)
        back = gguf.quants.dequantize(data, qtype)
        np.testing.assert_allclose(back.reshape(x.shape), x, atol=tol * 4, rtol=tol)


@needs_default_model
def test_truncated_gguf_gives_typed_error(tmp_path):
    from hearthlm.loader import default_model_path, load_model

    src = default_model_path().read_bytes()
    for size in (100, len(src) // 2):
        bad = tmp_path / f"cut{size}.gguf"
        bad.write_bytes(src[:size])
        with pytest.raises(ModelLoadError, match="download it again"):
            load_model(bad)


def test_garbage_files_give_typed_errors(tmp_path):
    from hearthlm.errors import ModelNotFoundError
    from hearthlm.loader import load_model

    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelLoadError):
        load_model(bad)
    d = tmp_path / "hfdir"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"')
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(d)
    with pytest.raises(ModelNotFoundError, match="not found .*`hearth list`"):
        load_model(tmp_path / "does-not-exist")


def test_truncated_safetensors_gives_typed_error(tiny, tmp_path):
    import shutil

    from hearthlm.loader import load_model

    src = tiny.path("llama")
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    st = dst / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 3])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(dst)
