"""The CPU attention kernel (pallas_kernels/cpu_attention*.cc) on SmolLM2-135M's heads, as a step uses it.

    .venv/bin/python benchmarks/attention_cpu.py [--cases 32,192,1 8,192,1 1,192,1 1,256,8 1,128,128 1,512,512]
    JAXSERVE_CPU_AVX512=0 .venv/bin/python benchmarks/attention_cpu.py    # the AVX2 kernel on an AVX-512 CPU
    .venv/bin/python benchmarks/attention_cpu.py --compare-tiles   # AMX tiles against float32 products, in turns

A case `seqs,context,query_len`: `seqs` sequences of `context` KV positions, each with its last `query_len`
tokens as queries (1: a decode step; a few: a verify step; the whole context: a prompt). 30 layers, each its
own bfloat16 K and V pages of 16 positions scattered over a pool (as a long-running server's free list leaves
them), one jitted call. Prints the kernel in use, then milliseconds (min and median of --repeats) and
nanoseconds per (query token, position) pair and layer. --compare-tiles (CPUs with AMX) times every case with
the products in AMX tiles and in float32 (JAXSERVE_CPU_AMX_ATTENTION, read when each is traced), call by call
in turns, so that the machine's drift reaches both alike.
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.pallas_kernels import attention, cpu_kernels

LAYERS, HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE, POOL_PAGES = 30, 9, 3, 64, 16, 2048


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["32,192,1", "8,192,1", "1,192,1", "1,256,8", "1,128,128",
                                                    "1,512,512"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--compare-tiles", action="store_true",
                    help="each case with the products in AMX tiles and in float32, in turns")
    args = ap.parse_args()
    assert cpu_kernels.available(), "the CPU kernels do not run here"
    assert not args.compare_tiles or cpu_kernels.has_amx_tiles(), "no AMX tiles here"
    print("kernel:", "AVX-512" if cpu_kernels.has_avx512_attention() else "AVX2")
    rng = np.random.default_rng(0)
    caches = [jnp.asarray(rng.standard_normal((POOL_PAGES, PAGE_SIZE, KV_HEADS, HEAD_DIM), dtype=np.float32),
                          jnp.bfloat16) for _ in range(2 * LAYERS)]
    one = functools.partial(attention.ragged_paged_attention, sm_scale=0.125, backend="cpu")
    # products -> (JAXSERVE_CPU_AMX_ATTENTION while traced, its own jitted step)
    settings = {"tiles": "1", "float32": "0"} if args.compare_tiles else {"default": None}
    steps = {name: jax.jit(lambda q, caches, *meta: sum(one(q + i, caches[2 * i], caches[2 * i + 1], *meta).sum()
                                                         for i in range(LAYERS))) for name in settings}

    def call(name, q, meta):
        if settings[name] is not None:
            os.environ["JAXSERVE_CPU_AMX_ATTENTION"] = settings[name]
        start = time.perf_counter()
        jax.block_until_ready(steps[name](q, caches, *meta))
        return time.perf_counter() - start

    print("| products | sequences | context | query tokens | min (ms) | median (ms) | ns a pair and layer |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        seqs, context, q_len = map(int, case.split(","))
        pages_per_seq = -(-context // PAGE_SIZE)
        assert seqs * pages_per_seq < POOL_PAGES, "more pages than the pool holds"
        table = rng.permutation(np.arange(1, POOL_PAGES))[:seqs * pages_per_seq].reshape(seqs, pages_per_seq)
        q = jnp.asarray(rng.standard_normal((seqs * q_len, HEADS, HEAD_DIM), dtype=np.float32))
        meta = (jnp.full((seqs,), context, jnp.int32), jnp.asarray(table, jnp.int32),
                jnp.arange(0, seqs * q_len + 1, q_len, dtype=jnp.int32), jnp.asarray([seqs], jnp.int32))
        times = {name: [] for name in settings}
        for name in settings:
            call(name, q, meta)  # traced and compiled
        for repeat in range(args.repeats):
            for name in (list(settings) if repeat % 2 == 0 else list(settings)[::-1]):
                times[name].append(call(name, q, meta))
        pairs = seqs * LAYERS * sum(context - q_len + i + 1 for i in range(q_len))
        for name, taken in times.items():
            best, median = 1000 * min(taken), 1000 * float(np.median(taken))
            print(f"| {name} | {seqs} | {context} | {q_len} | {best:.2f} | {median:.2f} | {best * 1e6 / pairs:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
