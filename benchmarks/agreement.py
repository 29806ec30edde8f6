"""Faithfulness (BENCHMARKS.md): how often greedy tokens equal HF transformers float32 on the same GGUF weights.

Engines, same prompts (token ids from our tokenizer, the chat template applied), N greedy tokens each:
  * hearthlm default (dtype auto: the native int8-activation kernel on CPU), each prompt alone and all in one batch;
  * hearthlm dtype float32, alone and batched;
  * llama.cpp (llama-server from the llama-cpp-python source package) on the same file, one slot one prompt at a
    time, then -np 4 with the prompts sent concurrently.
Reported: prompts whose N tokens all equal HF's, and the mean length of the common prefix.
Usage: python benchmarks/agreement.py --llama-server /path/to/llama-server [--tokens 32]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import subprocess
import time
import urllib.request

import torch

PROMPTS = [
    "What is the capital of Australia?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "Give me three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Translate 'Good morning, how are you?' into French.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "Write a Python function that reverses a string.",
    "What are the main causes of climate change?",
    "How many legs does a spider have?",
    "Suggest a name for a bakery that sells only bread.",
    "What is 17 times 23?",
    "Describe the water cycle.",
    "List four planets of the solar system.",
    "What does HTTP stand for?",
    "Write a short thank-you note to a teacher.",
    "Who wrote 'Pride and Prejudice'?",
    "How do vaccines work?",
    "What is a prime number? Give two examples.",
]


def prompt_ids(tok) -> list[list[int]]:
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
            for p in PROMPTS]


def hf_reference(path, ids: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in ids:
            gen = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def hearth(dtype: str, ids: list[list[int]], n: int, threads: int) -> tuple[list, list]:
    from hearthlm import LLM, SamplingParams

    llm = LLM(dtype=dtype, device="cpu", max_model_len=512, max_num_seqs=len(ids), enable_prefix_caching=False,
              threads=threads)
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    alone = [list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids) for p in ids]
    batch = [list(o.outputs[0].token_ids) for o in llm.generate(ids, sp, use_tqdm=False)]
    return alone, batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_cpp(server: str, path, ids: list[list[int]], n: int, threads: int, slots: int) -> list[list[int]]:
    port = _free_port()
    proc = subprocess.Popen([server, "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                             "-np", str(slots), "-c", str(512 * slots), "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if json.load(urllib.request.urlopen(url + "/health", timeout=1)).get("status") == "ok":
                    break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)

        def one(p: list[int]) -> list[int]:
            body = json.dumps({"prompt": p, "n_predict": n, "temperature": 0, "top_k": 1, "cache_prompt": False,
                               "ignore_eos": True, "return_tokens": True}).encode()
            req = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
            return json.load(urllib.request.urlopen(req, timeout=300))["tokens"][:n]

        if slots == 1:
            return [one(p) for p in ids]
        with cf.ThreadPoolExecutor(slots) as pool:
            return list(pool.map(one, ids))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def score(got: list[list[int]], ref: list[list[int]]) -> str:
    equal = sum(g == r for g, r in zip(got, ref))
    prefix = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(r)) for g, r in zip(got, ref)]
    return f"{equal}/{len(ref)} | {sum(prefix) / len(prefix):.1f}"


def main() -> None:
    from hearthlm.loader import default_model_path
    from hearthlm.loader.gguf import GGUFWeights
    from hearthlm.loader.tokenizer import tokenizer_from_gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", "llama-server"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = default_model_path()
    tok = tokenizer_from_gguf(GGUFWeights(path).metadata, [2])
    ids = prompt_ids(tok)
    ref = hf_reference(path, ids, args.tokens)
    rows = []
    for dtype in ("auto", "float32"):
        alone, batch = hearth(dtype, ids, args.tokens, args.threads)
        rows.append((f"hearthlm dtype={dtype}, each prompt alone", score(alone, ref)))
        rows.append((f"hearthlm dtype={dtype}, all {len(ids)} in one batch", score(batch, ref)))
        rows.append((f"hearthlm dtype={dtype}: batch == alone", f"{sum(a == b for a, b in zip(alone, batch))}/"
                     f"{len(ids)} | "))
    seq = llama_cpp(args.llama_server, path, ids, args.tokens, args.threads, 1)
    par = llama_cpp(args.llama_server, path, ids, args.tokens, args.threads, 4)
    rows.append(("llama.cpp, one slot, one prompt at a time", score(seq, ref)))
    rows.append(("llama.cpp, -np 4, prompts concurrent", score(par, ref)))
    rows.append(("llama.cpp: concurrent == one at a time", f"{sum(a == b for a, b in zip(seq, par))}/{len(ids)} | "))
    print(f"{len(ids)} chat prompts, {args.tokens} greedy tokens, reference HF transformers float32 on {path.name}")
    print("| engine | equal to HF (all tokens) | mean common prefix (tokens) |")
    print("|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s} |")


if __name__ == "__main__":
    main()
