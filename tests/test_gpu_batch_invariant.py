"""--batch-invariant on CUDA: a greedy request's tokens are the same alone, inside batches of 2 to 64 other
requests, with a warm prefix cache and with its prompt prefilled in small chunks (bf16 models), and the kernels
give each row the same bits whatever the rest of the call holds."""
from __future__ import annotations

import pytest
import torch

from .conftest import prompts_of

pytestmark = pytest.mark.gpu
TOKENS = 24


def greedy(llm, prompts, tokens: int = TOKENS) -> list[list[int]]:
    from hearthlm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]


@pytest.mark.parametrize("n,k,bias", [(2048, 2048, False), (896, 4864, True), (49152, 576, False), (100, 70, True)])
def test_invariant_linear_rows_do_not_depend_on_the_row_count(n, k, bias):
    from hearthlm.kernels.invariant_matmul import invariant_linear

    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(300, k, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    full = invariant_linear(x, w, b)
    torch.testing.assert_close(full.float(), torch.nn.functional.linear(x, w, b).float(), atol=2e-2, rtol=2e-2)
    for m in (1, 2, 5, 16, 17, 64, 65, 128, 129):
        assert torch.equal(invariant_linear(x[:m], w, b), full[:m]), m
        assert torch.equal(invariant_linear(x[-m:], w, b), full[-m:]), m


@pytest.mark.parametrize("window", [None, 50])
def test_invariant_attention_rows_do_not_depend_on_the_call(window):
    """One sequence's rows through the invariant prefill kernel: whole prompt, in chunks, one token at a time
    (decode), and beside another sequence: the same bits."""
    from hearthlm.kernels.prefill_attention import paged_prefill_attention

    heads, kv_heads, d, bs, length, blocks = 16, 8, 128, 16, 300, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    k_cache = torch.randn(blocks, bs, kv_heads, d, device="cuda", generator=g).to(torch.bfloat16)
    v_cache = torch.randn(blocks, bs, kv_heads, d, device="cuda", generator=g).to(torch.bfloat16)
    q = torch.randn(length, heads, d, device="cuda", generator=g).to(torch.bfloat16)
    table = torch.randperm(blocks - 1, device="cuda", generator=g)[:-(-length // bs)].to(torch.int32) + 1

    def attend(q_rows, tables, seq_lens, q_lens):
        cu = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
        return paged_prefill_attention(q_rows, k_cache, v_cache, tables, cu,
                                       torch.tensor(seq_lens, device="cuda", dtype=torch.int32), 0.088,
                                       window=window, max_seqlen_q=max(q_lens), invariant=True)

    whole = attend(q, table[None], [length], [length])
    pieces = [attend(q[lo:hi], table[None], [hi], [hi - lo]) for lo, hi in ((0, 17), (17, 100), (100, 101), (101, 300))]
    assert torch.equal(torch.cat(pieces), whole)
    for pos in (0, 15, 16, 157, 299):  # one query, as a decode step
        assert torch.equal(attend(q[pos:pos + 1], table[None], [pos + 1], [1]), whole[pos:pos + 1])
    other = torch.randn(1, heads, d, device="cuda", generator=g).to(torch.bfloat16)
    mixed = attend(torch.cat([other, q[150:190]]), torch.stack([table.flip(0), table]), [77, 190], [1, 40])
    assert torch.equal(mixed[1:], whole[150:190])


@pytest.fixture(scope="module")
def qwen_shape():
    """A random bf16 model of Qwen3-0.6B's shape (q/k norms, tied head), shared by the engines below."""
    from hearthlm.bench.models import build_pair

    hf, loaded = build_pair("qwen3-0.6b", torch.bfloat16, torch.device("cuda"))
    yield loaded
    del hf


def fillers(n: int, seed: int) -> list[list[int]]:
    return prompts_of(n, [5, 13, 29, 40, 77], seed=seed)


@pytest.fixture(scope="module")
def alone(qwen_shape):
    from hearthlm import LLM

    llm = LLM(loaded=qwen_shape, max_model_len=512, max_num_seqs=64, enable_prefix_caching=False,
              batch_invariant=True)
    prompts = prompts_of(6, [9, 33, 64, 120, 200, 17], seed=3)
    return llm, prompts, [greedy(llm, [p])[0] for p in prompts]


def test_same_tokens_alone_and_in_batches(alone):
    llm, prompts, want = alone
    assert greedy(llm, prompts[:2]) == want[:2]
    batch = fillers(3, 1)
    batch[1:1] = prompts[2:4]
    assert greedy(llm, batch)[1:3] == want[2:4]
    for size, stride, seed in ((16, 3, 2), (64, 11, 4)):
        batch = fillers(size - len(prompts), seed)
        for i, p in enumerate(prompts):
            batch.insert(stride * i, p)
        got = greedy(llm, batch)
        assert [got[stride * i] for i in range(len(prompts))] == want, size


def test_same_tokens_with_a_warm_prefix_cache_and_chunked_prefill(qwen_shape, alone):
    from hearthlm import LLM

    _, prompts, want = alone
    for chunk in (17, 64):
        llm = LLM(loaded=qwen_shape, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=chunk,
                  batch_invariant=True)
        assert greedy(llm, fillers(3, 5) + prompts)[3:] == want, chunk  # chunked, beside decode rows
        assert greedy(llm, prompts) == want, chunk  # every prompt cached
        del llm


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_and_softcap_families(tiny, family):
    """Sliding windows (24 tokens) and softcaps: alone, in a batch of 16 and chunked with a warm cache."""
    from hearthlm import LLM

    kw = dict(model=tiny.path(family), dtype="bfloat16", device="cuda", max_model_len=256, batch_invariant=True)
    llm = LLM(max_num_seqs=32, enable_prefix_caching=False, **kw)
    prompts = prompts_of(4, [30, 70, 5, 101], seed=8)
    want = [greedy(llm, [p], 40)[0] for p in prompts]
    batch = fillers(12, 9)
    for i, p in enumerate(prompts):
        batch.insert(4 * i, p)
    got = greedy(llm, batch, 40)
    assert [got[4 * i] for i in range(4)] == want
    del llm
    llm = LLM(max_num_seqs=8, max_num_batched_tokens=19, **kw)
    assert greedy(llm, fillers(2, 10) + prompts, 40)[2:] == want
    assert greedy(llm, prompts, 40) == want


def test_quantized_weights_are_refused(tiny):
    from hearthlm import LLM
    from hearthlm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="batch-invariant"):
        LLM(model=tiny.path("llama"), dtype="bfloat16", device="cuda", quantization="int8", batch_invariant=True)
