"""Offline time to the first token on the default model: one prompt of N random tokens, max_tokens=1.

    .venv/bin/python benchmarks/first_token.py [--dtype auto] [--lengths 64 128 192 250]

Prints the median and min of 10 requests per length (after 2 warm-up requests that compile the buckets).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from jaxserve import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 192, 250])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    llm = LLM(model=args.model, dtype=args.dtype)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for length in args.lengths:
        for _ in range(2):
            llm.generate([rng.integers(100, 40000, size=length).tolist()], params)
        times = []
        for _ in range(args.repeats):
            prompt = rng.integers(100, 40000, size=length).tolist()
            start = time.perf_counter()
            llm.generate([prompt], params)
            times.append(time.perf_counter() - start)
        print(f"{length}-token prompt: median {np.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
