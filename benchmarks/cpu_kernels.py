"""The CPU kernels (pallas_kernels/cpu_kernels) against XLA's paths, on SmolLM2-135M's shapes.

    .venv/bin/python benchmarks/cpu_kernels.py [--rows 1 2 8 32] [--seqs 2 32] [--context 192]

Projections: the 30 layers' seven projections (q, k, v, o, gate, up, down; per-layer weight arrays as the
unrolled decode step holds them) plus the tied LM head, for `rows` tokens, through XLA's bf16 dot, the bf16
kernel, the int8 kernel and GGUF's blocks (pallas_kernels/block_quant: 4-bit projections, an 8-bit head, as the
default model's file holds them, multiplied in float32). Attention: one decode step's attention for `seqs`
sequences of `context` tokens over 30 layers' bfloat16 pages (each layer its own, pages in order or
scattered), XLA's gather path against the kernel. Milliseconds per pass, median of --repeats.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.pallas_kernels import attention, block_quant, cpu_kernels

LAYERS, HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 30, 576, 1536, 9, 3, 64, 49152
PROJECTIONS = [(HIDDEN, HIDDEN), (HIDDEN, 192), (HIDDEN, 192), (HIDDEN, HIDDEN), (HIDDEN, MLP), (HIDDEN, MLP),
               (MLP, HIDDEN)]


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def projection_stack(project):
    """Every projection of every layer applied to x (the outputs summed so none is dead code)."""
    def run(x, layers):
        total = jnp.zeros((), jnp.float32)
        for weights in layers:
            for w, (k, _) in zip(weights, PROJECTIONS):
                total += project(x[:, :k], w).sum()
        return total
    return jax.jit(run)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 32, 128])
    ap.add_argument("--seqs", type=int, nargs="+", default=[2, 32])
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    assert cpu_kernels.available(), "the CPU kernels do not build here"
    rng = np.random.default_rng(0)
    bf16 = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.05, jnp.bfloat16)
    layers = [[bf16(k, n) for k, n in PROJECTIONS] for _ in range(LAYERS)]
    int8_layers = [[cpu_kernels.quantize_int8(w) for w in weights] for weights in layers]
    embedding = bf16(VOCAB, HIDDEN)

    def blocks(fmt, n, k):  # random tiled blocks of GGUF's formats
        nb = k // block_quant.BLOCK
        scales = rng.uniform(0.001, 0.01, (n, nb)).astype(np.float32)
        if fmt == "q8":
            return block_quant.tile({"qweight": rng.integers(-127, 128, (n, nb, 32), dtype=np.int8), "scales": scales})
        return block_quant.tile({"qweight": rng.integers(0, 256, (n, nb, 16), dtype=np.uint8), "scales": scales,
                                 "mins": -8 * scales})
    q4_layers = [[tuple(map(jnp.asarray, blocks("q4", n, k).values())) for k, n in PROJECTIONS] for _ in range(LAYERS)]
    q8_embedding = tuple(map(jnp.asarray, blocks("q8", VOCAB, HIDDEN).values()))
    weight_mb = sum(w.size * 2 for weights in layers for w in weights) / 1e6
    print(f"projections: {weight_mb:.0f} MB of bf16 weights per pass; head {embedding.size * 2 / 1e6:.0f} MB")
    print("| rows | XLA bf16 dot | bf16 kernel | int8 kernel | q4 blocks | head: XLA | head: kernel | head: q8 blocks |")
    print("|---|---|---|---|---|---|---|---|")
    xla = projection_stack(cpu_kernels.matmul)
    kernel = projection_stack(cpu_kernels.kernel_matmul)
    int8 = projection_stack(lambda x, qs: cpu_kernels.int8_matmul(x, *qs))
    q4 = projection_stack(lambda x, w: block_quant.matmul(x, *w))
    head_xla = jax.jit(lambda x, e: cpu_kernels.matmul(x, e, True))
    head_kernel = jax.jit(lambda x, e: cpu_kernels.kernel_matmul(x, e, True))
    head_q8 = jax.jit(lambda x, e: block_quant.matmul(x, *e))
    for rows in args.rows:
        x = bf16(rows, MLP)
        cells = [timed(f, x, w, repeats=args.repeats)
                 for f, w in ((xla, layers), (kernel, layers), (int8, int8_layers), (q4, q4_layers))]
        head = [timed(f, x[:, :HIDDEN], e, repeats=args.repeats)
                for f, e in ((head_xla, embedding), (head_kernel, embedding), (head_q8, q8_embedding))]
        print(f"| {rows} | " + " | ".join(f"{ms:.1f}" for ms in cells + head) + " |", flush=True)

    # As the engine holds it: a bfloat16 cache, each layer its own K and V arrays (so a step reads every
    # layer's rows from memory, not one layer's from cache), pages of 16 tokens either in order or scattered
    # over a pool, as a long-running server's free list leaves them.
    page_size, pool_pages = 16, 2048
    print(f"\nattention, {LAYERS} layers, decode, {args.context}-token contexts, bfloat16 cache")
    print("| sequences | XLA path, pages in order (ms) | kernel, in order (ms) | kernel, scattered (ms) |")
    print("|---|---|---|---|")
    caches = [jnp.asarray(rng.standard_normal((pool_pages, page_size, KV_HEADS, HEAD_DIM), dtype=np.float32),
                          jnp.bfloat16) for _ in range(2 * LAYERS)]
    for seqs in args.seqs:
        pages_per_seq = -(-args.context // page_size) + 1
        assert seqs * pages_per_seq < pool_pages, "more pages than the pool holds"
        tables = {"in order": 1 + np.arange(seqs * pages_per_seq),
                  "scattered": rng.permutation(np.arange(1, pool_pages))[:seqs * pages_per_seq]}
        q = jnp.asarray(rng.standard_normal((seqs, HEADS, HEAD_DIM), dtype=np.float32))
        meta = lambda order: (jnp.full((seqs,), args.context, jnp.int32),
                              jnp.asarray(tables[order].reshape(seqs, pages_per_seq), jnp.int32),
                              jnp.arange(seqs + 1, dtype=jnp.int32), jnp.asarray([seqs], jnp.int32))

        def layers_of(backend):
            one = functools.partial(attention.ragged_paged_attention, sm_scale=0.125, backend=backend)
            return jax.jit(lambda q, caches, *m: sum(one(q + i, caches[2 * i], caches[2 * i + 1], *m).sum()
                                                     for i in range(LAYERS)))
        times = [timed(layers_of(b), q, caches, *meta(order), repeats=args.repeats)
                 for b, order in (("xla", "in order"), ("cpu", "in order"), ("cpu", "scattered"))]
        print(f"| {seqs} | " + " | ".join(f"{ms:.1f}" for ms in times) + " |", flush=True)


if __name__ == "__main__":
    main()
