"""Cold start: process start to first token for a model already on local disk (a fresh interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = r"""
import logging, time, sys
t0 = time.perf_counter()
marks = []


class Marks(logging.Handler):  # every INFO line of the start-up, stamped from process start
    def emit(self, record):
        marks.append((time.perf_counter() - t0, record.getMessage()[:110]))


logging.getLogger("hearthlm").addHandler(Marks())
logging.getLogger("hearthlm").setLevel(logging.INFO)
import torch
t_torch = time.perf_counter()
from hearthlm import LLM, SamplingParams
t_import = time.perf_counter()
llm = LLM(model=sys.argv[1], max_model_len=2048, max_num_seqs=16)
t1 = time.perf_counter()
llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
t2 = time.perf_counter()
print(f"import torch {t_torch - t0:.2f}s; import hearthlm {t_import - t_torch:.2f}s; engine built "
      f"{t1 - t_import:.2f}s; first token {t2 - t1:.2f}s; total {t2 - t0:.2f}s")
for at, msg in marks:
    print(f"  {at:6.2f}s  {msg}")
"""


def run_coldstart(args) -> int:
    import torch

    from .models import build_pair

    path = args.model
    if path is None or not (os.path.isfile(path) or os.path.exists(os.path.join(path, "config.json"))):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        hf, loaded = build_pair(args.preset, getattr(torch, args.dtype), device)
        path = path or tempfile.mkdtemp(prefix="hearth-cold-")
        hf.save_pretrained(path)
        loaded.tokenizer.save(path)
        del hf, loaded
    out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=False)
    print(f"# hearth bench coldstart {args.preset if args.model is None else path}")
    print(out.stdout.strip() or out.stderr[-2000:])
    return out.returncode
