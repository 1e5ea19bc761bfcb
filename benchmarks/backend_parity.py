"""Greedy decoding with the Pallas attention kernels against the XLA path, both inside the whole engine.

    python benchmarks/backend_parity.py --model DIR [--dtype float32] [--prompts 8] [--tokens 32]

Runs the same prompts through two engines in one process (attention_backend pallas, then xla) and reports, per
prompt, how many greedy tokens agree and the largest |logprob| difference over the agreeing prefix. On an
accelerator this checks the compiled kernels in their real setting (paged KV written by the engine, chunked
prefill, ragged decode batches); on the CPU the kernels run interpreted, so keep the model tiny there.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from jaxserve import LLM, SamplingParams


def run(backend: str, args, prompts):
    llm = LLM(model=args.model, dtype=args.dtype, attention_backend=backend, max_model_len=1024,
              kv_cache_memory=args.kv_bytes, max_num_seqs=len(prompts), max_num_batched_tokens=256)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params)
    del llm
    return [(list(o.outputs[0].token_ids), [next(iter(d.values())).logprob for d in o.outputs[0].logprobs])
            for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--kv-bytes", type=int, default=2 << 30)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # Ragged lengths that cross page boundaries and need several prefill chunks.
    lengths = [int(n) for n in rng.integers(5, 600, size=args.prompts)]
    prompts = [rng.integers(100, 40000, size=n).tolist() for n in lengths]
    pallas, xla = run("pallas", args, prompts), run("xla", args, prompts)
    rows = []
    for n, (pt, pl), (xt, xl) in zip(lengths, pallas, xla):
        agree = next((i for i, (a, b) in enumerate(zip(pt, xt)) if a != b), len(pt))
        diff = max((abs(a - b) for a, b in zip(pl[:agree], xl[:agree])), default=0.0)
        rows.append({"prompt_len": n, "tokens_agree": agree, "of": len(pt), "max_logprob_diff": round(diff, 5)})
        print(rows[-1], flush=True)
    total = sum(r["tokens_agree"] for r in rows)
    print(f"greedy tokens agreeing: {total}/{sum(r['of'] for r in rows)}; "
          f"max |logprob diff| {max(r['max_logprob_diff'] for r in rows):.2e}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"dtype": args.dtype, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
