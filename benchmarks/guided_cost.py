"""Throughput cost of guided decoding inside the continuous batch (offline, default model).

    .venv/bin/python benchmarks/guided_cost.py [--rows 8] [--tokens 48]

Runs `rows` requests of `tokens` generated tokens each (ignore_eos-free JSON-schema rows stop when the grammar
completes, so every row uses a schema that cannot finish early: a long array of integers) in three mixes:
all unguided, half guided, all guided; reports ms per engine step and per-row-token costs.
"""
from __future__ import annotations

import argparse
import time

from jaxserve import LLM, GuidedDecodingParams, SamplingParams

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 200}


def run(llm: LLM, guided_rows: int, rows: int, tokens: int) -> tuple[float, int]:
    eng = llm.engine
    for i in range(rows):
        guided = GuidedDecodingParams(json=SCHEMA, whitespace_pattern="") if i < guided_rows else None
        eng.add_request(f"g{guided_rows}-{i}", f"List numbers {i}:", SamplingParams(
            temperature=0.8, seed=i, max_tokens=tokens, ignore_eos=True, guided_decoding=guided))
    steps, start = 0, time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    return (time.perf_counter() - start) * 1000 / steps, steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    llm = LLM(max_model_len=512, max_num_seqs=args.rows, max_num_batched_tokens=64)
    run(llm, args.rows // 2, args.rows, 4)  # warm the grammar cache and the bitmask sampler variant
    print("| guided rows | unguided rows | ms / step | steps |\n|---|---|---|---|")
    for guided in (0, args.rows // 2, args.rows):
        ms, steps = run(llm, guided, args.rows, args.tokens)
        print(f"| {guided} | {args.rows - guided} | {ms:.1f} | {steps} |", flush=True)


if __name__ == "__main__":
    main()
