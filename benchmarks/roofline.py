"""This machine's roofline on the JAX CPU backend: memory bandwidth, matmul FLOP/s, and jit call overhead.

The engine's step time is compared against these peaks (issue 6): small decode batches are bound by streaming
the weights (GB/s), large batches by matmul throughput (GFLOP/s), and tiny steps by the per-call overhead.

    nice .venv/bin/python benchmarks/roofline.py --json-out roofline.json

Every number is the best of repeated runs (the least disturbed by other processes on shared cores); the median
is reported beside it. Arrays for bandwidth are far larger than the last-level cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402  (after JAX_PLATFORMS: this probe measures the CPU)
import jax.numpy as jnp  # noqa: E402


@dataclass(frozen=True)
class Measurement:
    name: str
    best_s: float
    median_s: float
    reps: int
    work: float  # bytes moved or FLOPs done per call
    unit: str  # "GB/s" or "GFLOP/s" or "us/call"

    @property
    def best_rate(self) -> float:
        return self.best_s * 1e6 if self.unit == "us/call" else self.work / self.best_s / 1e9

    @property
    def median_rate(self) -> float:
        return self.median_s * 1e6 if self.unit == "us/call" else self.work / self.median_s / 1e9


def time_calls(fn: Callable[[], object], budget_s: float, min_reps: int = 3) -> tuple[float, float, int]:
    """(best, median, reps) seconds per call of `fn`, after one untimed call (compilation, page faults)."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_reps or time.perf_counter() < deadline:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times), len(times)


def measure(name: str, fn: Callable[[], object], work: float, unit: str, budget_s: float) -> Measurement:
    best, median, reps = time_calls(fn, budget_s)
    return Measurement(name, best, median, reps, work, unit)


def bandwidth(size_mb: int, budget_s: float) -> list[Measurement]:
    n = size_mb * 2**20 // 4
    src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    x = jnp.asarray(src)
    jax_sum = jax.jit(jnp.sum)
    jax_scale = jax.jit(lambda a: a * 2.0)  # reads and writes every byte, into a fresh output buffer
    # Donated: the output reuses the input's buffer, as the engine's donated KV caches do (no page faults).
    jax_scale_inplace = jax.jit(lambda a: a * 0.5, donate_argnums=0)
    held = [jnp.asarray(src)]

    def scale_inplace() -> None:
        held[0] = jax_scale_inplace(held[0]).block_until_ready()

    side = int(np.sqrt(n))
    w32 = jnp.asarray(src[: side * side].reshape(side, side))
    w16 = w32.astype(jnp.bfloat16)
    v32, v16 = jnp.ones((side,), jnp.float32), jnp.ones((side,), jnp.bfloat16)
    matvec = jax.jit(jnp.matmul)  # a batch-1 decode step: every weight byte read once, 2 FLOPs per weight
    nbytes = src.nbytes
    return [
        measure("numpy copy (read+write)", lambda: np.copyto(dst, src), 2 * nbytes, "GB/s", budget_s),
        measure("numpy sum (read)", lambda: src.sum(), nbytes, "GB/s", budget_s),
        measure("jax.jit sum (read)", lambda: jax_sum(x).block_until_ready(), nbytes, "GB/s", budget_s),
        measure("jax.jit x*2 new buffer (read+write)", lambda: jax_scale(x).block_until_ready(), 2 * nbytes,
                "GB/s", budget_s),
        measure("jax.jit x*.5 donated (read+write)", scale_inplace, 2 * nbytes, "GB/s", budget_s),
        measure(f"jax.jit matvec f32 {side}x{side}", lambda: matvec(w32, v32).block_until_ready(),
                w32.nbytes, "GB/s", budget_s),
        measure(f"jax.jit matvec bf16 {side}x{side}", lambda: matvec(w16, v16).block_until_ready(),
                w16.nbytes, "GB/s", budget_s),
    ]


def matmuls(sizes: list[int], dtypes: list[str], budget_s: float) -> list[Measurement]:
    out = []
    mm = jax.jit(jnp.matmul)
    for dtype in dtypes:
        for n in sizes:
            a = jnp.asarray(np.random.default_rng(n).standard_normal((n, n), dtype=np.float32)).astype(dtype)
            b = a.T + 1
            out.append(measure(f"matmul {dtype} {n}x{n}x{n}", lambda: mm(a, b).block_until_ready(),
                               2.0 * n**3, "GFLOP/s", budget_s))
    return out


def decode_shaped(batches: list[int], budget_s: float) -> list[Measurement]:
    """The default model's MLP up-projection ([B, 576] x [576, 1536]) at decode batch sizes, float32."""
    out = []
    mm = jax.jit(jnp.matmul)
    w = jnp.ones((576, 1536), jnp.float32)
    for b in batches:
        x = jnp.ones((b, 576), jnp.float32)
        out.append(measure(f"matmul f32 [{b},576]x[576,1536]", lambda: mm(x, w).block_until_ready(),
                           2.0 * b * 576 * 1536, "GFLOP/s", budget_s))
    return out


def jit_overhead(budget_s: float) -> list[Measurement]:
    small = jnp.ones((8,), jnp.float32)
    add_one = jax.jit(lambda a: a + 1)
    # An engine step passes one K and one V cache per layer (30 layers on the default model): 60 array args.
    many = [jnp.ones((8,), jnp.float32) for _ in range(60)]
    touch_all = jax.jit(lambda arrays: [a + 1 for a in arrays])
    return [
        measure("jit call, 1 array, blocked", lambda: add_one(small).block_until_ready(), 1, "us/call", budget_s),
        measure("jit call, 60 arrays, blocked", lambda: jax.block_until_ready(touch_all(many)), 1, "us/call",
                budget_s),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=256, help="array size for the bandwidth probes")
    p.add_argument("--sizes", default="256,512,1024,2048", help="square matmul sizes")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--budget-s", type=float, default=1.5, help="timing budget per probe, seconds")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = (bandwidth(args.size_mb, args.budget_s) + matmuls(sizes, args.dtypes.split(","), args.budget_s)
               + decode_shaped([1, 8, 32, 128], args.budget_s) + jit_overhead(args.budget_s))
    print(f"{'probe':<40}{'best':>12}{'median':>12}  unit      reps")
    for m in results:
        print(f"{m.name:<40}{m.best_rate:>12.1f}{m.median_rate:>12.1f}  {m.unit:<9}{m.reps:>5}")
    if args.json_out:
        machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                   "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}
        rows = [{**asdict(m), "best_rate": m.best_rate, "median_rate": m.median_rate} for m in results]
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
