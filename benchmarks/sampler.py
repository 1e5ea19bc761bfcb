"""Per-call time of each jitted sampler variant, and the host cost of building one step's tensors.

    .venv/bin/python benchmarks/sampler.py [--sizes 1 8 32 64] [--vocab 49152] [--repeats 15] [--cpu-kernel]

--cpu-kernel: the top_k / top_p / min_p cut-offs and the logprobs through pallas_kernels/cpu_sampling.cc, as an
engine on one CPU device runs them.

Prints a markdown table for docs/benchmarks.md: per call, after compilation, the median and (in
parentheses) the fastest of --repeats calls in milliseconds; on a shared machine the fastest is the
steadier number.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.pallas_kernels import cpu_kernels
from jaxserve.sampler import sample
from jaxserve.sampling_metadata import (RowSamplingState, allowed_token_mask, build_sampling_tensors,
                                        pack_token_mask)
from jaxserve.sampling_params import SamplingParams

MAX_LOGPROBS = 20
PROMPT_LEN, OUTPUT_LEN = 512, 128


def variant_params(vocab: int) -> dict[str, tuple[dict, str]]:
    """name → (SamplingParams keywords of every row, which logits to use)."""
    even_tokens = list(range(0, vocab, 2))
    return {
        "greedy": (dict(temperature=0.0), "peaked"),
        "temperature": (dict(temperature=0.8), "peaked"),
        "top_k=50 top_p=0.9": (dict(temperature=0.8, top_k=50, top_p=0.9), "peaked"),
        "top_p=0.9 (in window)": (dict(temperature=0.8, top_p=0.9), "peaked"),
        "top_p=0.9 (flat: exact fallback)": (dict(temperature=1.0, top_p=0.9), "flat"),
        "min_p=0.05": (dict(temperature=0.8, min_p=0.05), "peaked"),
        "penalties (W=1024)": (dict(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.2,
                                    presence_penalty=0.2), "peaked"),
        "logit_bias + allowed_token_ids": (dict(temperature=0.8, logit_bias={1: 1.0, 2: -1.0},
                                                allowed_token_ids=even_tokens), "peaked"),
        "greedy + logprobs (K=20)": (dict(temperature=0.0, logprobs=5), "peaked"),
        "everything": (dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                            presence_penalty=0.2, logit_bias={1: 1.0}, allowed_token_ids=even_tokens,
                            logprobs=5), "peaked"),
    }


def make_rows(params: dict, count: int, vocab: int, rng: np.random.Generator) -> list[RowSamplingState]:
    """Rows as the engine would hold them: token lists, the allowed mask precomputed per request."""
    rows = []
    for i in range(count):
        sampling = SamplingParams(**params)
        rows.append(RowSamplingState(sampling, rng.integers(0, vocab, PROMPT_LEN).tolist(),
                                     rng.integers(0, vocab, OUTPUT_LEN).tolist(), seed=i,
                                     allowed_mask=allowed_token_mask(sampling, vocab)))
    return rows


def make_logits(kind: str, size: int, vocab: int, rng: np.random.Generator) -> jax.Array:
    # "peaked" resembles a confident LM step (most mass on a few tokens); "flat" spreads it widely.
    scale = 8.0 if kind == "peaked" else 1.0
    return jnp.asarray(rng.standard_normal((size, vocab)).astype(np.float32) * scale)


def time_call(fn, *args, repeats: int, **kwargs) -> tuple[str, float]:
    """("median (fastest)" ms of a call, seconds of the first call, i.e. the compilation)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        times.append(time.perf_counter() - start)
    return f"{statistics.median(times) * 1e3:.2f} ({min(times) * 1e3:.2f})", compile_s


def time_host_build(rows, size: int, vocab: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build_sampling_tensors(rows, size, vocab, MAX_LOGPROBS)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cpu-kernel", action="store_true")
    args = parser.parse_args()
    assert not args.cpu_kernel or cpu_kernels.available(), "the CPU kernels do not build here"
    rng = np.random.default_rng(0)
    jitted = jax.jit(functools.partial(sample, cpu_kernel=args.cpu_kernel), static_argnames="flags")

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, V={args.vocab}, cpu_kernel={args.cpu_kernel}, "
          f"penalty rows: prompt {PROMPT_LEN} + output {OUTPUT_LEN} tokens\n")
    print("| variant | " + " | ".join(f"S={s}" for s in args.sizes) + f" | compile S={args.sizes[-1]} |")
    print("|---|" + "---:|" * (len(args.sizes) + 1))
    host_rows = {}
    for name, (params, logits_kind) in variant_params(args.vocab).items():
        cells = []
        for size in args.sizes:
            rows = make_rows(params, size, args.vocab, rng)
            tensors, flags = build_sampling_tensors(rows, size, args.vocab, MAX_LOGPROBS)
            tensors = jax.device_put(tensors)
            logits = make_logits(logits_kind, size, args.vocab, rng)
            cell, compile_s = time_call(jitted, logits, tensors, repeats=args.repeats, flags=flags)
            cells.append(cell)
            host_rows[name] = rows
        print(f"| {name} | " + " | ".join(cells) + f" | {compile_s:.2f} s |", flush=True)

    size = max(args.sizes)
    print(f"\nHost build_sampling_tensors for {size} rows (median ms):")
    for name in ("greedy", "everything"):
        print(f"- {name}: {time_host_build(host_rows[name], size, args.vocab, args.repeats):.3f} ms")
    guided = [RowSamplingState(SamplingParams(temperature=0.8), [1], [2], seed=i,
                               bitmask=pack_token_mask(rng.random(args.vocab) < 0.5)) for i in range(size)]
    print(f"- guided bitmask rows: {time_host_build(guided, size, args.vocab, args.repeats):.3f} ms")


if __name__ == "__main__":
    main()
