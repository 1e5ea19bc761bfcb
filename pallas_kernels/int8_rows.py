"""Projections as int8 rows in AMX int8 tiles (int8_rows_amx.cc): weights stored as int8 with one float32
scale per output row, activations quantized to int8 with one scale per token, both rotated first by the same
orthonormal transform (a 64-point Walsh-Hadamard transform of every 64-value block of K) so that x . w is
unchanged while a few large activations no longer set a whole token's scale.

Layout: `qweight` int8 [N / 16, K * 16], each 16-row group's K in 64-value chunks ([N / 16, K / 64, 16, 64]: an
AMX tile's A side as it is stored), `scales` float32 [N / 16, 16]. Both may be stacked over layers ([L, ...]).

Every sum is an exact integer and the float part the same three roundings everywhere, so `reference_matmul`
(pure JAX) gives the kernel's outputs bit for bit, at every row count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernels

TARGET = "jaxserve_int8_rows_matmul"
CHUNK = 64  # K values per rotated block and per tile row
ROWS = 16  # outputs per tile


def fits(rows: int, cols: int) -> bool:
    """Whether a [rows, cols] weight can be held as int8 rows."""
    return rows % ROWS == 0 and cols % CHUNK == 0


def available() -> bool:
    """Whether the kernel runs here (AMX int8 tiles: cpu_kernels.has_amx_int8_tiles)."""
    return cpu_kernels.available() and cpu_kernels.has_amx_int8_tiles()


def rotate(x):
    """x [..., K] (numpy or JAX, float32) with each 64-value block through the orthonormal Walsh-Hadamard
    transform: six butterfly stages (value i with i + h: the lower gets a + b, the upper a - b), then 1/8. It
    is its own inverse. The kernel's arithmetic, operation for operation."""
    xp = np if isinstance(x, np.ndarray) else jnp
    shape = x.shape
    for h in (1, 2, 4, 8, 16, 32):
        pairs = x.reshape(*shape[:-1], shape[-1] // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = xp.stack([a + b, a - b], axis=-2).reshape(shape)
    return x * x.dtype.type(0.125)


def _rotate_fast(w: np.ndarray) -> np.ndarray:
    """rotate(w) for numpy weights as one matrix product with the 64 x 64 Sylvester-Hadamard matrix (the
    butterflies' transform; ~5x faster at load, equal up to the order of the sums, which only the activations'
    rotation must keep)."""
    h = np.ones((1, 1), np.float32)
    for _ in range(6):
        h = np.block([[h, h], [h, -h]])
    return (w.reshape(-1, CHUNK) @ (h * np.float32(0.125))).reshape(w.shape)


def _quantize(r, xp):
    """Rows of rotated values -> (int8 values, float32 scale a row): scale = max |value| * (1 / 127), a product
    (XLA makes a division by a constant one), values rounded from value * (127 / max), ties to even."""
    peak = xp.max(xp.abs(r), axis=-1)
    ok = (peak > 0) & xp.isfinite(peak)
    inverse = xp.where(ok, np.float32(127) / xp.where(ok, peak, np.float32(1)), np.float32(0)).astype(np.float32)
    q = xp.clip(xp.round(r * inverse[..., None]), -127, 127).astype(np.int8)
    scale = xp.where(xp.isfinite(peak), peak * (np.float32(1) / np.float32(127)), np.float32(np.nan))
    return q, scale.astype(np.float32)  # a row with a NaN or inf: every output NaN


def pack(w: np.ndarray) -> dict[str, np.ndarray]:
    """A float [N, K] weight as int8 rows: {"qweight", "scales"} in the layout above."""
    n, k = w.shape
    assert fits(n, k), (n, k)
    q, scale = _quantize(_rotate_fast(np.asarray(w, np.float32)), np)
    tiles = q.reshape(n // ROWS, ROWS, k // CHUNK, CHUNK).transpose(0, 2, 1, 3).reshape(n // ROWS, k * ROWS)
    return {"qweight": np.ascontiguousarray(tiles), "scales": scale.reshape(n // ROWS, ROWS)}


def _int_rows(qweight):
    """qweight [N / 16, K * 16] -> int8 [N, K], still rotated."""
    tiles, per = qweight.shape
    k = per // ROWS
    return qweight.reshape(tiles, k // CHUNK, ROWS, CHUNK).transpose(0, 2, 1, 3).reshape(tiles * ROWS, k)


def dequantize(qweight, scales):
    """The float32 [N, K] weight int8 rows stand for (rotated back)."""
    rows = _int_rows(jnp.asarray(qweight)).astype(jnp.float32)
    return rotate(rows * jnp.asarray(scales).reshape(-1, 1))


def lookup_rows(qweight, scales, ids):
    """Rows `ids` of the weight (an embedding's), float32 [T, K]."""
    tiles, per = qweight.shape
    k = per // ROWS
    ids = jnp.asarray(ids, jnp.int32)
    rows = qweight.reshape(tiles, k // CHUNK, ROWS, CHUNK)[ids // ROWS, :, ids % ROWS, :].reshape(-1, k)
    return rotate(rows.astype(jnp.float32) * scales.reshape(-1)[ids][:, None])


def reference_matmul(x, qweight, scales):
    """x [M, K] . w^T as the kernel computes it, bit for bit: x rotated and quantized per row, the int8 dot in
    int32, then (float(sum) * x's scale) * the output's scale."""
    q, x_scale = _quantize(rotate(jnp.asarray(x, jnp.float32)), jnp)
    sums = jnp.dot(q.astype(jnp.int32), _int_rows(jnp.asarray(qweight)).astype(jnp.int32).T,
                   preferred_element_type=jnp.int32)
    return (sums.astype(jnp.float32) * x_scale[:, None]) * jnp.asarray(scales).reshape(1, -1)


def matmul(x, qweight, scales, layer=None, rows=None, gated=False, argmax=False) -> jax.Array:
    """x [M, K] float32 through the kernel -> float32 [M, N]; `layer` picks from stacked weights; `rows`: only
    x's first rows are real (the rest come out zero); `gated`: [M, N / 2] = silu(the first N / 2 outputs) * the
    rest; `argmax`: int32 [M], each row's first largest output (N - 1 for a row with a NaN), never writing the
    outputs (an LM head's greedy tokens)."""
    n = qweight.shape[-2] * ROWS
    m = x.shape[0]
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    rows = jnp.asarray(m if rows is None else rows, jnp.int32).reshape(())
    if argmax:
        out = jax.ShapeDtypeStruct((m,), jnp.int32)
    else:
        out = jax.ShapeDtypeStruct((m, n // 2 if gated else n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32), qweight, scales, layer, rows,
                                         gated=bool(gated), argmax=bool(argmax))
