"""Time the GPU Pallas ragged paged-attention kernel against the XLA path on a real GPU.

    python benchmarks/attention_gpu.py [--context 2048] [--prefill 2048] [--dtype bfloat16]

First checks the compiled kernel against the pure-JAX reference (float32, small ragged batch with
GQA, sliding window, soft cap) and against the XLA path at every benchmark shape, then prints a
markdown table: decode batches 1..64 (one new token per sequence, `--context` KV tokens each) and
one `--prefill`-token prefill, plus the KV write (Pallas kernel vs XLA scatter).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.pallas_kernels.attention import write_kv, xla_ragged_paged_attention
from jaxserve.pallas_kernels.kv_write import write_kv_pallas
from jaxserve.pallas_kernels.ragged_attention_gpu import ragged_paged_attention_gpu
from jaxserve.pallas_kernels.reference import ref_ragged_paged_attention


def make_batch(rng, q_lens, kv_lens, *, num_heads, num_kv_heads, head_dim, page_size, dtype,
               num_seq_slots=None, num_tokens=None):
    """Random ragged batch whose sequences own disjoint, shuffled pages (page 0 = scratch)."""
    num_live = len(q_lens)
    num_seq_slots = num_seq_slots or num_live
    num_tokens = num_tokens or int(sum(q_lens))
    pages_per_seq = max(-(-kv // page_size) for kv in kv_lens)
    num_pages = 1 + num_live * pages_per_seq
    perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    page_indices = np.zeros((num_seq_slots, pages_per_seq), np.int32)
    page_indices[:num_live] = perm.reshape(num_live, pages_per_seq)
    cu = np.zeros(num_seq_slots + 1, np.int32)
    cu[1:num_live + 1] = np.cumsum(q_lens)
    cu[num_live + 1:] = cu[num_live]
    kv = np.zeros(num_seq_slots, np.int32)
    kv[:num_live] = kv_lens
    shape_kv = (num_pages, page_size, num_kv_heads, head_dim)
    return dict(
        q=jnp.asarray(rng.standard_normal((num_tokens, num_heads, head_dim)), dtype),
        k_pages=jnp.asarray(rng.standard_normal(shape_kv), dtype),
        v_pages=jnp.asarray(rng.standard_normal(shape_kv), dtype),
        kv_lens=jnp.asarray(kv), page_indices=jnp.asarray(page_indices),
        cu_q_lens=jnp.asarray(cu), num_seqs=jnp.asarray([num_live], jnp.int32),
    )


def time_ms(step, state, iters, repeats=5):
    """Median over `repeats` of (time of `iters` back-to-back calls) / iters, in ms.

    Calls are queued asynchronously and synchronised once per repeat, so host dispatch overlaps
    device work and the figure approaches device time per call. `step(state) -> state` lets a
    call thread donated buffers into the next.
    """
    for _ in range(2):
        state = jax.block_until_ready(step(state))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            state = step(state)
        jax.block_until_ready(state)
        samples.append((time.perf_counter() - start) * 1e3 / iters)
    return float(np.median(samples)), state


def check_against_reference(rng, interpret):
    """float32, ragged: q lens 1..40, a page-boundary kv len, padded slots, window and soft cap;
    GQA 4:1 with head_dim 64 and SmolLM2's 9 q / 3 kv heads (a group of 3 rows per token)."""
    worst = 0.0
    for num_heads, num_kv_heads in ((8, 2), (9, 3)):
        batch = make_batch(rng, [1, 7, 40, 1], [33, 16, 64, 5], num_heads=num_heads,
                           num_kv_heads=num_kv_heads, head_dim=64, page_size=16,
                           dtype=jnp.float32, num_seq_slots=6, num_tokens=56)
        for options in ({}, {"sliding_window": 20}, {"soft_cap": 5.0}):
            want = ref_ragged_paged_attention(**batch, sm_scale=0.125, **options)
            got = ragged_paged_attention_gpu(**batch, sm_scale=0.125, interpret=interpret,
                                             **options)
            worst = max(worst, float(jnp.max(jnp.abs(want - got))))
    print(f"float32 kernel vs reference: max |diff| = {worst:.2e}")
    assert worst < 1e-4, worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=2048, help="KV tokens per decode sequence")
    parser.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the prefill")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--interpret", action="store_true",
                        help="CPU dry run of this script with tiny shapes (timings meaningless)")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    rng = np.random.default_rng(0)
    check_against_reference(rng, args.interpret)

    shapes = dict(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                  head_dim=args.head_dim, page_size=args.page_size, dtype=dtype)
    sm_scale = args.head_dim ** -0.5
    pallas = jax.jit(lambda b: ragged_paged_attention_gpu(
        **b, sm_scale=sm_scale, interpret=args.interpret))
    cases = [(f"decode x{n}", [1] * n, [args.context] * n, 1)
             for n in map(int, args.batches.split(","))]
    cases.append((f"prefill {args.prefill}", [args.prefill], [args.prefill], 8))
    print(f"\n{args.num_heads} q heads, {args.num_kv_heads} kv heads, head_dim {args.head_dim}, "
          f"page_size {args.page_size}, {args.dtype}; ms per call, {args.iters} calls queued back "
          "to back, median of 5\n")
    print("| case | tokens | KV tokens read | XLA path (ms) | Pallas GPU (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, q_lens, kv_lens, query_block in cases:
        batch = make_batch(rng, q_lens, kv_lens, **shapes)
        xla = jax.jit(lambda b, qb=query_block: xla_ragged_paged_attention(
            **b, sm_scale=sm_scale, query_block=qb))
        diff = float(jnp.max(jnp.abs(pallas(batch).astype(jnp.float32)
                                     - xla(batch).astype(jnp.float32))))
        assert diff < 5e-2, (name, diff)
        t_xla, _ = time_ms(lambda _: xla(batch), None, args.iters)
        t_pallas, _ = time_ms(lambda _: pallas(batch), None, args.iters)
        print(f"| {name} | {sum(q_lens)} | {sum(kv_lens)} | {t_xla:.3f} | {t_pallas:.3f} | "
              f"{t_xla / t_pallas:.2f}x |")

    print("\n| KV write | tokens | XLA scatter (ms) | Pallas kernel (ms) |")
    print("|---|---|---|---|")
    for num_tokens in (64, args.prefill):
        num_pages = 1 + (64 if args.interpret else 4096)
        shape = (num_pages, args.page_size, args.num_kv_heads, args.head_dim)
        k_pages, v_pages = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        new = jnp.asarray(rng.standard_normal((num_tokens, args.num_kv_heads, args.head_dim)),
                          dtype)
        slots = jnp.asarray(rng.permutation(num_pages * args.page_size)[:num_tokens], jnp.int32)
        scatter = jax.jit(write_kv, donate_argnums=(0, 1))
        want, _ = scatter(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), new, new, slots)
        pallas_write = functools.partial(write_kv_pallas, interpret=args.interpret)
        got, _ = pallas_write(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), new, new, slots)
        assert bool(jnp.array_equal(want, got)), "write_kv_pallas disagrees with the scatter"
        del want, got
        timings = []
        for fn in (scatter, pallas_write):  # the pages are donated: thread them through
            elapsed, (k_pages, v_pages) = time_ms(
                lambda pages, fn=fn: fn(*pages, new, new, slots), (k_pages, v_pages), args.iters)
            timings.append(elapsed)
        print(f"| write {num_tokens} tokens | {num_tokens} | {timings[0]:.3f} | {timings[1]:.3f} |")


if __name__ == "__main__":
    main()
