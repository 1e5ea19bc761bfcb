"""Greedy decoding with the Pallas attention kernels against the XLA path, both inside the whole engine.

    python benchmarks/backend_parity.py --model DIR [--dtype float32] [--prompts 8] [--tokens 32]
        [--backends pallas,xla] [--save run.json] [--reference cpu.json] [--compare other_run.json]

Runs the same prompts through one engine per attention backend, in one process, and reports per prompt how
many greedy tokens agree with the first backend's (or with `--reference`, a `--save`d run from another process,
e.g. the CPU's) and the largest |logprob| difference over the agreeing prefix. On an accelerator this checks the
compiled kernels in their real setting (paged KV written by the engine, chunked prefill, ragged decode
batches); on the CPU the kernels run interpreted, so keep the model tiny there.
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


def compare(name: str, got, want, lengths) -> list[dict]:
    rows = []
    for n, (gt, gl), (wt, wl) in zip(lengths, got, want):
        agree = next((i for i, (a, b) in enumerate(zip(gt, wt)) if a != b), len(gt))
        diff = max((abs(a - b) for a, b in zip(gl[:agree], wl[:agree])), default=0.0)
        rows.append({"prompt_len": n, "tokens_agree": agree, "of": len(gt), "max_logprob_diff": round(diff, 5)})
        print(rows[-1], flush=True)
    print(f"{name}: greedy tokens agreeing {sum(r['tokens_agree'] for r in rows)}/{sum(r['of'] for r in rows)}; "
          f"max |logprob diff| {max(r['max_logprob_diff'] for r in rows):.2e}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--kv-bytes", type=int, default=2 << 30)
    ap.add_argument("--backends", default="pallas,xla")
    ap.add_argument("--save", default=None, help="write every backend's tokens and logprobs here")
    ap.add_argument("--reference", default=None, help="compare against the first backend of this --save file")
    ap.add_argument("--compare", default=None, help="a --save file to compare instead of running engines")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # Ragged lengths that cross page boundaries and need several prefill chunks.
    lengths = [int(n) for n in rng.integers(5, 600, size=args.prompts)]
    prompts = [rng.integers(100, 40000, size=n).tolist() for n in lengths]
    if args.compare:  # no engine: compare two saved runs
        with open(args.compare) as f:
            results = json.load(f)["results"]
    else:
        results = {b: run(b, args, prompts) for b in args.backends.split(",")}
    backends = list(results)
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"dtype": args.dtype, "lengths": lengths, "results": results}, f)
    if args.reference:
        with open(args.reference) as f:
            ref = json.load(f)
        want = next(iter(ref["results"].values()))
        for b in backends:
            compare(f"{b} vs reference", results[b], want, lengths)
    for b in backends[1:]:
        compare(f"{b} vs {backends[0]}", results[b], results[backends[0]], lengths)


if __name__ == "__main__":
    main()
