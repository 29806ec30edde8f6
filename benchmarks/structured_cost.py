"""The cost of JSON-schema decoding against free decoding, same model, same run (issue 18).

Each row generates exactly --tokens tokens per sequence: free decoding with ignore_eos, and constrained decoding
with a schema whose one string field is longer than --tokens tokens (so the grammar never ends it early). Rounds
alternate free / constrained; the figure is the median of --rounds.

    python benchmarks/structured_cost.py --batch 1 16 [--model PATH] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

from hearthlm import LLM, SamplingParams, StructuredOutput

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "year", "story"],
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                         "story": {"type": "string", "minLength": 4000}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    llm = LLM(args.model, device=args.device, max_model_len=1024)
    prompt = llm.engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story as JSON with a title, a year and the story."}])
    spec = StructuredOutput(json=SCHEMA)
    print(f"# {llm.engine.device}, {args.tokens} tokens per sequence, median of {args.rounds} rounds")
    for b in args.batch:
        def run(structured: StructuredOutput | None) -> float:
            ps = [SamplingParams(temperature=1.0, seed=s, max_tokens=args.tokens, ignore_eos=structured is None,
                                 structured=structured) for s in range(b)]
            t = time.perf_counter()
            outs = llm.generate([prompt] * b, ps, use_tqdm=False)
            dt = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            assert n == b * args.tokens, f"{n} tokens, expected {b * args.tokens}"
            return n / dt

        run(None), run(spec)  # warm-up (and the grammar's compilation)
        free, constrained = [], []
        for _ in range(args.rounds):
            free.append(run(None))
            constrained.append(run(spec))
        f, c = statistics.median(free), statistics.median(constrained)
        print(f"batch {b:3d}: free {f:8.1f} tok/s, json schema {c:8.1f} tok/s, ratio {c / f:.3f} "
              f"(cost {100 * (1 - c / f):+.1f}%)")


if __name__ == "__main__":
    main()
