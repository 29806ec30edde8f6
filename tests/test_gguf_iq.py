"""GGUF IQ types (loader/gguf_dequant.py): the torch decode of IQ4_NL / IQ4_XS equals gguf-py's on blocks built from
random codes; a tiny llama GGUF whose matrices are IQ4_NL, IQ4_XS, IQ2_*, IQ3_* and IQ1_* blocks from random codes
matches HF transformers on the weights gguf-py decodes; a type the loader does not read is a typed error naming the
nearest supported one. (gguf-py quantizes none of the IQ types, so the blocks are drawn, not quantized.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hearthlm import LLM
from hearthlm.errors import UnsupportedModelError

from .conftest import assert_greedy_like_hf, prompts_of


def _blocks(name: str, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes per row] uint8 of random codes with a small positive fp16 scale per block."""
    import gguf

    t = gguf.GGMLQuantizationType[name]
    block, size = gguf.GGML_QUANT_SIZES[t]
    b = rng.integers(0, 256, (rows * k // block, size), dtype=np.uint8)
    d = rng.uniform(2e-4, 1e-3, b.shape[0]).astype(np.float16).view(np.uint16)
    if name == "IQ1_M":  # the scale's 16 bits are the top nibbles of the block's last four uint16
        sc = b[:, -8:].copy().view(np.uint16)
        for i in range(4):
            sc[:, i] = (sc[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
        b[:, -8:] = sc.view(np.uint8)
    else:  # the others start with it
        b[:, :2] = d.reshape(-1, 1).view(np.uint8)
    return b.reshape(rows, -1)


def _decode(name: str, raw: np.ndarray) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float32)


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
def test_iq4_torch_decode_matches_gguf(name):
    from hearthlm.loader.gguf_dequant import dequantize

    raw = _blocks(name, 16, 512, np.random.default_rng(1))
    got = dequantize(torch.from_numpy(raw), name, (16, 512))
    np.testing.assert_array_equal(got.numpy(), _decode(name, raw))


# per layer, the GGUF type of q, k, v, o, gate, up, down
_TYPES = [["IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ3_S", "IQ2_XS", "IQ3_XXS", "IQ1_M"],
          ["IQ4_XS", "IQ2_S", "IQ1_S", "IQ4_NL", "IQ3_XXS", "IQ2_XXS", "IQ4_XS"]]
_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _write(path, cfg, hf_dir, tensors: dict[str, tuple[str | None, np.ndarray]]) -> None:
    import gguf

    from hearthlm.quant.sources import write_shape_metadata
    from hearthlm.quant.vocab import write_hf_tokenizer

    w = gguf.GGUFWriter(str(path), "llama")
    write_shape_metadata(w, cfg)
    write_hf_tokenizer(w, hf_dir, cfg.vocab_size)
    for name, (kind, data) in tensors.items():
        if kind is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_iq_gguf_matches_hf(tmp_path, default_tokenizer):
    import transformers

    from hearthlm.loader.safetensors import read_hf_config

    hcfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hcfg).eval()
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    default_tokenizer.save(hf_dir)
    cfg = read_hf_config(hf_dir)
    sd = hf.state_dict()
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (None, sd["model.embed_tokens.weight"].numpy()),
               "output_norm.weight": (None, sd["model.norm.weight"].numpy())}  # tied head: no output.weight
    for i, kinds in enumerate(_TYPES):
        p = f"model.layers.{i}."
        tensors[f"blk.{i}.attn_norm.weight"] = (None, sd[p + "input_layernorm.weight"].numpy())
        tensors[f"blk.{i}.ffn_norm.weight"] = (None, sd[p + "post_attention_layernorm.weight"].numpy())
        for proj, kind in zip(_PROJ, kinds):
            name = p + ("mlp." if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn.") + proj + ".weight"
            n, k = sd[name].shape
            raw = _blocks(kind, n, k, rng)
            w = torch.from_numpy(_decode(kind, raw)).reshape(n, k)
            if proj in ("q_proj", "k_proj"):  # the file's rows are in llama.cpp's order: HF's are its inverse
                heads = cfg.num_heads if proj == "q_proj" else cfg.num_kv_heads
                w = w.reshape(heads, n // heads // 2, 2, k).transpose(1, 2).reshape(n, k)
            sd[name] = w
            tensors[f"blk.{i}.{_GGUF[proj]}.weight"] = (kind, raw)
    hf.load_state_dict(sd)
    path = tmp_path / "iq.gguf"
    _write(path, cfg, hf_dir, tensors)

    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128)
    assert set(llm.engine.loaded.quantization.split("/")) >= {"IQ4_NL", "IQ4_XS", "IQ1_M", "IQ2_S", "IQ3_S"}
    prompts = prompts_of(2, [21, 8], seed=3)
    assert_greedy_like_hf(llm, hf, prompts, 6)

    # a type the loader does not read: a typed error naming the nearest supported one
    import gguf

    from hearthlm.loader.gguf import GGUFWeights

    t = sd["model.layers.0.self_attn.v_proj.weight"].numpy()
    w = gguf.GGUFWriter(str(tmp_path / "tq.gguf"), "llama")
    w.add_tensor("blk.0.attn_v.weight", gguf.quants.quantize(t, gguf.GGMLQuantizationType.TQ1_0),
                 raw_dtype=gguf.GGMLQuantizationType.TQ1_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="TQ1_0.*nearest supported type is IQ1_M"):
        GGUFWeights(tmp_path / "tq.gguf")
