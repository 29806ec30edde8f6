"""Same answer under any load: a greedy request gives the same tokens alone, inside batches of 2 to 64 other
requests, with its prefix (or all of its prompt) in the prefix cache, and with its prompt prefilled in small chunks,
on the default CPU path (GGUF weights on the native kernel), the native kernel's AVX2 build (cpu_kernel avx2: what
CPUs without AVX-512 run; also built and run on AVX-512 CPUs) and the float32 path. Default model, real weights."""
from __future__ import annotations

import pytest

from .conftest import needs_default_model, prompts_of

pytestmark = needs_default_model

SHARED = ("The following is a detailed account of the long voyage of the merchant ship Aurora, which left the "
          "harbour of Lisbon in the spring of 1789 bound for")
PROMPTS = ["The history of the printing press", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The capital of France is", SHARED + " the East Indies", "Explain photosynthesis in simple terms."]
TOKENS = 24


def generate(llm, prompts: list, tokens: int = TOKENS) -> list[list[int]]:
    from hearthlm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]


def fillers(llm, n: int, seed: int) -> list[str]:
    return [llm.tokenizer.decode(p) for p in prompts_of(n, [5, 13, 29, 40], seed=seed)]


@pytest.fixture(scope="module", params=["auto", "float32", "avx2"])
def dtype(request) -> str:
    """The engine's path: dtype auto (the native kernel, the CPU's best ISA), float32, or avx2 (dtype auto with
    cpu_kernel avx2)."""
    if request.param == "avx2":
        from hearthlm.kernels import cpu_quant

        if not cpu_quant.cpu_flags().issuperset(cpu_quant.ISA_NEEDS["avx2"]) or cpu_quant.library("avx2") is None:
            pytest.skip("no AVX2 build of the native kernel here")
        if cpu_quant.library("avx2") is cpu_quant.library():
            pytest.skip("the native build is the AVX2 one here: auto runs it")
    return request.param


def engine_args(dtype: str) -> dict:
    return dict(dtype="auto", cpu_kernel="avx2") if dtype == "avx2" else dict(dtype=dtype)


@pytest.fixture(scope="module")
def cold(dtype):
    """No prefix cache; each prompt alone is the reference."""
    from hearthlm import LLM

    llm = LLM(**engine_args(dtype), device="cpu", max_model_len=256, max_num_seqs=64, enable_prefix_caching=False)
    if dtype != "float32":
        assert llm.engine.runner.model.layers[0].native, "the default CPU path should be the native kernel"
    if dtype == "avx2":
        assert llm.engine.runner.model.layers[0].qkv.native.lib.hl_simd() in (2, 3)
    return llm, [generate(llm, [p])[0] for p in PROMPTS]


def test_same_tokens_alone_and_in_batches(cold, dtype):
    llm, alone = cold
    assert generate(llm, PROMPTS[:2]) == alone[:2]  # batch of 2
    batch = fillers(llm, 3, 1)
    batch[1:1] = PROMPTS[2:4]  # batch of 5, at rows 1 and 2
    assert generate(llm, batch)[1:3] == alone[2:4]
    batch = fillers(llm, 10, 2)
    for i, p in enumerate(PROMPTS):  # batch of 16, at rows 0, 3, 6, ...
        batch.insert(3 * i, p)
    got = generate(llm, batch)
    assert [got[3 * i] for i in range(len(PROMPTS))] == alone
    if dtype != "auto":  # float32: one library kernel for every row count already; avx2: auto's bits (CI time)
        return
    batch = fillers(llm, 58, 3)
    for i, p in enumerate(PROMPTS):  # batch of 64, its first 8 tokens
        batch.insert(11 * i, p)
    got = generate(llm, batch, 8)
    assert [got[11 * i] for i in range(len(PROMPTS))] == [a[:8] for a in alone]


def test_same_tokens_with_a_warm_prefix_cache_and_chunked_prefill(cold, dtype):
    from hearthlm import LLM

    _, alone = cold
    for chunk in (17, 31) if dtype == "auto" else (17,):
        llm = LLM(**engine_args(dtype), device="cpu", max_model_len=256, max_num_seqs=16,
                  max_num_batched_tokens=chunk)
        if chunk == 17:  # a prompt sharing a long prefix with PROMPTS[4] runs first: PROMPTS[4] finds it cached
            generate(llm, [SHARED + " the coast of Brazil"], 1)
            assert generate(llm, [PROMPTS[4]]) == [alone[4]]
        got = generate(llm, fillers(llm, 2, 5) + PROMPTS)  # chunked prefill, mixed with decode rows
        assert got[2:] == alone, chunk
        assert generate(llm, PROMPTS) == alone, chunk  # every prompt cached: only its last block recomputed
        del llm
