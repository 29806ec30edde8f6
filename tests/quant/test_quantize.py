"""`hearth quantize`: GGUF output that hearthlm and HF transformers load with the same greedy tokens."""
from __future__ import annotations

import pytest
import torch

from hearthlm import LLM, SamplingParams
from hearthlm.cli.main import main
from hearthlm.quant import perplexity_llm, window_logits

PROMPT = [1, 504, 3458, 282, 4649, 314, 1234, 29, 77, 900]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _greedy(path) -> list[int]:
    llm = LLM(model=str(path), dtype="float32", device="cpu", num_kv_blocks=16, max_num_seqs=1)
    return llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("family", ["llama", "llama31", "mistral", "qwen2", "qwen3", "gemma2"])
def test_f32_export_matches_the_hf_model(tiny, tiny_gguf, family):
    """Names, q/k permutation, biases, Gemma's (1 + w) norms, sliding windows and Llama-3.1 rope_freqs survive
    the round trip: every position's logits equal the HF model's."""
    ids = PROMPT * 3  # 30 tokens: past the 24-token sliding window of the mistral and gemma2 fixtures
    ours = window_logits(perplexity_llm(str(tiny_gguf(family, "f32")), len(ids)), [ids])[0]
    torch.testing.assert_close(ours, tiny.logits(family, ids), atol=2e-4, rtol=1e-4)


def test_q8_0_loads_in_hearthlm_and_transformers_with_same_greedy_tokens(tiny_gguf):
    from transformers import AutoModelForCausalLM

    path = tiny_gguf("llama", "q8_0")
    ours = _greedy(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                          eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert len(ours) == 24 and ours == ref


def _read(path) -> tuple[dict[str, str], dict[str, tuple]]:
    """(tensor name -> GGML type name, key -> (value, value type, element type)) of a GGUF file."""
    import gguf

    from hearthlm.loader.gguf_header import GGUFFile
    from hearthlm.quant.sources import read_typed_kv

    f = GGUFFile(path)
    types = {n: gguf.GGMLQuantizationType(t.ggml_type).name for n, t in f.tensors.items()}
    return types, {k: (v, t, sub) for k, v, t, sub in read_typed_kv(f.buf)}


def test_q8_0_file_layout_and_metadata(tiny_gguf):
    import gguf

    types, kv = _read(tiny_gguf("llama", "q8_0"))
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings stay tied
    u32, s = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING
    assert kv["general.architecture"] == (b"llama", s, None)
    assert kv["general.file_type"] == (gguf.LlamaFileType.MOSTLY_Q8_0, u32, None)
    assert kv["llama.block_count"] == (4, u32, None) and kv["llama.attention.head_count_kv"] == (2, u32, None)
    assert kv["llama.rope.dimension_count"][0] == 16 and kv["llama.context_length"][0] == 1024
    assert kv["tokenizer.ggml.model"][0] == b"gpt2" and kv["tokenizer.ggml.pre"][0] == b"smollm"
    tokens, token_types, merges = (kv[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "merges"))
    assert len(tokens[0]) == len(token_types[0]) == 49152 and tokens[2] == s and token_types[2] == gguf.GGUFValueType.INT32
    assert merges[0][0] == b"\xc4\xa0 t"  # "Ġ t", the first merge
    assert kv["tokenizer.ggml.bos_token_id"][0] == 1 and kv["tokenizer.ggml.eos_token_id"][0] == 2
    assert kv["tokenizer.ggml.padding_token_id"][0] == 2
    assert b"im_start" in kv["tokenizer.chat_template"][0]


def test_k_quant_mix_from_gguf_source(tiny, tiny_gguf):
    """A GGUF re-quantized to q4_k_m keeps its metadata and loads; 64-wide rows fall back like llama.cpp."""
    import gguf

    src = tiny_gguf("qwen3", "f32")
    path = tiny_gguf("qwen3", "q4_k_m", source=src)
    types, kv = _read(path)
    assert types["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K, but 64 % 256 != 0
    # 4 layers: use_more_bits picks layers 2 and 3 -> Q6_K, which falls back to Q8_0 for 64/128-wide rows
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q5_0", "Q5_0", "Q8_0", "Q8_0"]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q5_0", "Q5_0", "Q8_0", "Q8_0"]
    assert types["output.weight"] == "Q8_0" and types["blk.0.attn_q_norm.weight"] == "F32"
    assert kv["general.file_type"][0] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    _, src_kv = _read(src)
    assert {k: v for k, v in kv.items() if k != "general.file_type"} == \
        {k: v for k, v in src_kv.items() if k != "general.file_type"}
    assert len(_greedy(path)) == 24


def test_quantize_cli(tiny, tmp_path, capsys):
    out = tmp_path / "t.gguf"
    assert main(["quantize", tiny.path("llama"), "--to", "Q8_0", "-o", str(out), "--no-eval"]) == 0
    assert out.is_file() and not (tmp_path / "t.gguf.part").exists()
    assert "Q8_0 x" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["missing-model-dir", "--to", "q8_0"], "not found"),
    (["{tiny}", "--to", "q3_xs"], "not a known type"),
    (["{tiny}", "--to", "q8_0", "-o", "/no/such/dir/x.gguf"], "does not exist"),
    (["{gguf}", "--to", "q8_0", "-o", "{gguf}"], "is the input model"),
    (["{gemma3}", "--to", "q8_0"], "convert_hf_to_gguf.py"),
])
def test_quantize_bad_input_exits_1(tiny, tiny_gguf, tmp_path, capsys, argv, message):
    subs = {"tiny": tiny.path("llama"), "gguf": str(tiny_gguf("llama", "q8_0")), "gemma3": tiny.path("gemma3")}
    argv = [a.format(**subs) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "x.gguf")]
    assert main(["quantize", *argv]) == 1
    assert message in capsys.readouterr().err
