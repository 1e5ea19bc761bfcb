"""Offline decode/prefill step times of the engine on the default model, next to the machine's roofline.

    .venv/bin/python benchmarks/throughput.py [--dtype float32] [--batches 1 2 4 8 16 32 64]

Decode: `batch` sequences with 128-token prompts each generate 128 tokens (ignore_eos); the time per step
is the decode phase's wall time over its steps. Prefill: one 512-token prompt.
Achieved GB/s = bytes the step must read (weights + live KV) / step time; GFLOP/s = 2 x params x tokens / time.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from jaxserve import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokenizer", default=None, help="for a model without its own (e.g. a GGUF without one)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default=None, choices=["int8", "gguf", "w8a8", "none"])
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="one step in flight (default: the platform's)")
    ap.add_argument("--num-speculative-tokens", type=int, default=None, help="prompt-lookup drafts (0: off)")
    ap.add_argument("--tokens-out", default=None, help="write each decode request's tokens here (JSON)")
    args = ap.parse_args()
    extra = {k: v for k, v in (("async_scheduling", args.async_scheduling),
                               ("num_speculative_tokens", args.num_speculative_tokens)) if v is not None}
    llm = LLM(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, max_model_len=1024, max_num_seqs=max(args.batches),
              max_num_batched_tokens=512, **extra)
    eng = llm.engine
    cfg = eng.model_config
    leaves = eng.runner.params[0] + eng.runner.params[1]
    paths = eng.runner.split.outer_paths + eng.runner.split.layer_paths
    weight_bytes = sum(a.nbytes for a in leaves)
    # Weights multiplied per token (block-quantized 4-bit ones hold two per byte; their scales are not weights).
    params = sum((2 if a.dtype == np.uint8 else 1) * a.size for a, p in zip(leaves, paths)
                 if p[-1] not in ("scales", "mins"))
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * eng.runner.kv_cache[0].dtype.itemsize
    rng = np.random.default_rng(0)
    rows, tokens = [], {}
    for batch in args.batches:
        prompts = [rng.integers(100, 40000, size=args.prompt_len).tolist() for _ in range(batch)]
        sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm
        for i, p in enumerate(prompts):
            eng.add_request(f"b{batch}-{i}", p, sp)
        steps, decode_time, first = 0, 0.0, True
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            outputs = eng.step()
            dt = time.perf_counter() - t
            tokens.update((o.request_id, o.outputs[0].token_ids) for o in outputs if o.finished)
            if all(not s.in_prefill for s in eng.scheduler.running) and not eng.scheduler.waiting and not first:
                steps += 1
                decode_time += dt
            first = False
        step_ms = 1000 * decode_time / max(steps, 1)
        kv_bytes = batch * (args.prompt_len + args.output_len / 2) * kv_per_token
        rows.append({"batch": batch, "step_ms": round(step_ms, 2), "tok_per_s": round(batch * 1000 / step_ms, 1),
                     "GB_per_s": round((weight_bytes + kv_bytes) / step_ms / 1e6, 1),
                     "GFLOP_per_s": round(2 * params * batch / step_ms / 1e6, 1)})
        print(rows[-1], flush=True)
    prompt = rng.integers(100, 40000, size=512).tolist()
    llm.generate([prompt], SamplingParams(max_tokens=1))
    t = time.perf_counter()
    llm.generate([rng.integers(100, 40000, size=512).tolist()], SamplingParams(max_tokens=1))
    prefill_ms = 1000 * (time.perf_counter() - t)
    prefill = {"prefill_tokens": 512, "ms": round(prefill_ms, 1), "tok_per_s": round(512 * 1000 / prefill_ms, 1),
               "GFLOP_per_s": round(2 * params * 512 / prefill_ms / 1e6, 1)}
    print(prefill)
    print("| batch | step ms | tok/s | GB/s | GFLOP/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms']} | {r['tok_per_s']} | {r['GB_per_s']} | {r['GFLOP_per_s']} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"dtype": args.dtype, "async_scheduling": eng.config.async_scheduling, "decode": rows,
                       "prefill": prefill}, f, indent=2)
    if args.tokens_out:
        with open(args.tokens_out, "w") as f:
            json.dump(tokens, f)


if __name__ == "__main__":
    main()
