"""The default model's projections as GGUF blocks in bfloat16 AMX tiles against int8 rows in int8 tiles.

    .venv/bin/python benchmarks/int8_rows.py [--rows 1 8 32 128] [--repeats 20]

Per projection kind (q/k/v fused, o, gate/up fused with its activation, down) the 30 layers' calls, each layer
its own weights as the engine holds them, and the tied head once (its greedy tokens: argmax). Random weights of
SmolLM2-135M's shapes: 4-bit blocks for the projections and an 8-bit head, as the default GGUF holds them,
against int8 rows of the same shapes. The two are alternated call by call (this machine's speed drifts by
minutes); milliseconds, medians.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.pallas_kernels import block_quant, cpu_kernels, int8_rows

LAYERS, HIDDEN, VOCAB = 30, 576, 49152
# (name, K, N, gated)
KINDS = [("qkv", 576, 960, False), ("o", 576, 576, False), ("gate_up", 576, 3072, True), ("down", 1536, 576, False)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    assert cpu_kernels.available() and cpu_kernels.has_amx_tiles() and int8_rows.available(), "needs AMX int8"
    rng = np.random.default_rng(0)

    def blocks(n, k, four_bit=True):
        nb = k // block_quant.BLOCK
        scales = rng.uniform(0.001, 0.01, (n, nb)).astype(np.float32)
        packed = ({"qweight": rng.integers(0, 256, (n, nb, 16), dtype=np.uint8), "scales": scales, "mins": -8 * scales}
                  if four_bit else {"qweight": rng.integers(-127, 128, (n, nb, 32), dtype=np.int8), "scales": scales})
        return tuple(map(jnp.asarray, block_quant.tile(packed).values()))

    def rows(n, k):
        packed = int8_rows.pack(rng.standard_normal((n, k)).astype(np.float32))
        return jnp.asarray(packed["qweight"]), jnp.asarray(packed["scales"])

    def stack(k, gated, fn):
        def run(x, layers):
            total = jnp.zeros((), jnp.float32)
            for w in layers:
                total += fn(x[:, :k], w, gated).sum()
            return total
        return jax.jit(run)

    plans = {
        "blocks": (lambda x, w, g: block_quant.matmul(x, *w, bf16=True, gated=g),
                   lambda x, w: block_quant.matmul(x, *w, bf16=True, argmax=True), blocks,
                   lambda: blocks(VOCAB, HIDDEN, four_bit=False)),
        "int8 rows": (lambda x, w, g: int8_rows.matmul(x, *w, gated=g),
                      lambda x, w: int8_rows.matmul(x, *w, argmax=True), rows, lambda: rows(VOCAB, HIDDEN)),
    }
    calls = {}  # (plan, kind) -> (jitted, weights)
    for plan, (project, head, make, make_head) in plans.items():
        for name, k, n, gated in KINDS:
            calls[plan, name] = stack(k, gated, project), [make(n, k) for _ in range(LAYERS)]
        calls[plan, "head"] = jax.jit(lambda x, w, head=head: head(x[:, :HIDDEN], w).sum()), make_head()
    names = [kind[0] for kind in KINDS] + ["head"]
    print("| rows | plan | " + " | ".join(names) + " | total |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for m in args.rows:
        x = jnp.asarray(rng.standard_normal((m, 1536), dtype=np.float32))
        times = {key: [] for key in calls}
        for key, (fn, w) in calls.items():
            jax.block_until_ready(fn(x, w))
        for i in range(args.repeats):
            for name in names:
                for plan in (plans if i % 2 else list(plans)[::-1]):
                    fn, w = calls[plan, name]
                    start = time.perf_counter()
                    jax.block_until_ready(fn(x, w))
                    times[plan, name].append(time.perf_counter() - start)
        for plan in plans:
            ms = [1000 * float(np.median(times[plan, name])) for name in names]
            print(f"| {m} | {plan} | " + " | ".join(f"{t:.2f}" for t in ms) + f" | {sum(ms):.2f} |", flush=True)


if __name__ == "__main__":
    main()
