"""Projections over block-quantized weights: GGUF's Q4_0 / Q4_1 / Q8_0 tensors kept in their 32-value blocks.

A decode step on the CPU is a stream of weights: a 4-bit block streams 0.75 bytes per weight against
bfloat16's 2. The kernels (block_quant.cc, built with cpu_kernels.py's library) quantize each activation row
per block to about 14 bits (a coarse int8 value plus its remainder at 1/128 of the unit; llama.cpp's single
8-bit plane visibly changed the default model's answers) and take every block's dot product in integers.

Two formats, a row of 32-value blocks per output (GGUF's own rows), interleaved in tiles of TILE rows block
by block so the kernel reads each array as one sequential stream:
- "q4": `qweight` uint8 [N/TILE, K/32 * TILE * 16] (byte j of a block: value j low nibble, value j + 16 high),
  `scales` and `mins` float32 [N/TILE, K/32 * TILE]; w = scale * q + min with q in [0, 15]. Q4_0 is the
  same with min = -8 * scale.
- "q8": `qweight` int8 [N/TILE, K/32 * TILE * 32], `scales` as above; w = scale * q.
Any of them may be stacked over layers ([L, ...]); `layer` then picks one in place.

`reference_matmul` is the pure-JAX oracle: the same activation rounding, integer block dots, float32 sums.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernels

BLOCK = 32
TILE = 2
Q4_TARGET, Q8_TARGET = "jaxserve_q4_matmul", "jaxserve_q8_matmul"
DEQUANTIZE_TARGETS = {(four_bit, jnp.dtype(dtype)): f"jaxserve_q{4 if four_bit else 8}_dequantize_{suffix}"
                      for four_bit in (True, False) for dtype, suffix in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16"))}
# In float32, rows (tokens) from which the kernels multiply over weight panels they unpack (block_quant.cc's
# kFloatMinRows; below it, integer dots over the blocks), and from which a step instead unpacks whole layers
# for XLA's GEMM. Measured crossovers on this class of machine (docs/benchmarks.md). In bfloat16 (bf16=True on
# a CPU with AVX512-BF16) every step takes the bfloat16 panels: one path, so a row's result does not depend
# on the batch it runs in.
FLOAT_MIN_ROWS = 12
DENSE_MIN_ROWS = 64

# GGUF block types -> (our format, bytes per block)
GGUF_FORMATS = {"Q4_0": ("q4", 18), "Q4_1": ("q4", 20), "Q8_0": ("q8", 34)}


def format_of(gguf_type_name: str) -> str | None:
    """"q4" / "q8" for the GGUF block types kept as blocks, None for the rest (they dequantize)."""
    entry = GGUF_FORMATS.get(gguf_type_name)
    return entry[0] if entry else None


def pack_gguf(raw: np.ndarray, gguf_type_name: str) -> dict[str, np.ndarray]:
    """One GGUF tensor's raw bytes [N, blocks * block_bytes] -> row-major {"qweight" [N, blocks, bytes],
    "scales" [N, blocks][, "mins"]}; `tile` then interleaves the rows for the kernels."""
    fmt, block_bytes = GGUF_FORMATS[gguf_type_name]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, block_bytes)
    scale = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if gguf_type_name == "Q8_0":
        return {"qweight": blocks[:, :, 2:].copy().view(np.int8), "scales": scale}
    if gguf_type_name == "Q4_1":
        mins = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[:, :, 4:]
    else:  # Q4_0: w = scale * (q - 8)
        mins, nibbles = -8.0 * scale, blocks[:, :, 2:]
    return {"qweight": np.ascontiguousarray(nibbles), "scales": scale, "mins": mins}


def tile(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row-major packed arrays ([N, blocks(, bytes)]) -> the kernels' tiles [N/TILE, blocks * TILE(* bytes)]."""
    def one(a):
        n, blocks = a.shape[:2]
        a = a.reshape(n // TILE, TILE, blocks, -1).swapaxes(1, 2)
        return np.ascontiguousarray(a).reshape(n // TILE, -1)
    return {name: one(a) for name, a in arrays.items()}


def _untile(a, blocks: int):
    """[..., N/TILE, blocks * TILE * E] -> [..., N, blocks, E] (jax or numpy)."""
    a = a.reshape(*a.shape[:-1], blocks, TILE, -1)
    a = a.swapaxes(-3, -2)
    return a.reshape(*a.shape[:-4], a.shape[-4] * TILE, blocks, a.shape[-1])


def _values(qweight, blocks: int, four_bit: bool):
    """The integer values [..., N, blocks, 32] of tiled weights (uint8 0..15 or int8)."""
    q = _untile(qweight, blocks)
    if not four_bit:
        return q
    xp = np if isinstance(q, np.ndarray) else jnp
    return xp.concatenate([q & 0x0F, q >> 4], axis=-1)


def dequantize(qweight, scales, mins=None):
    """Tiled weights -> float32 [..., N, K] (jax or numpy): a test's oracle."""
    blocks = scales.shape[-1] // TILE
    values = _values(qweight, blocks, mins is not None).astype(np.float32)
    out = values * _untile(scales, blocks)
    if mins is not None:
        out = out + _untile(mins, blocks)
    return out.reshape(*out.shape[:-2], -1)


def lookup_rows(qweight, scales, mins, ids):
    """Rows `ids` of tiled weights [N/TILE, ...] dequantized -> float32 [len(ids), K] (an embedding lookup):
    each id's tile is dequantized and its row picked."""
    tiles = [jnp.take(a, ids // TILE, axis=0) for a in (qweight, scales, mins) if a is not None]
    rows = dequantize(*tiles).reshape(ids.shape[0], TILE, -1)  # [T, TILE, K]
    return jnp.take_along_axis(rows, (ids % TILE)[:, None, None], axis=1)[:, 0]


def quantize_activations(x: jax.Array):
    """x [M, K] float32 -> (int32 values [M, K/32, 32], fine unit [M, K/32], sum [M, K/32]) with x ~= unit *
    values to about 14 bits: per block, a coarse int8 plane c in units of d = max|x| / 127 and a fine one f
    (what c leaves, in units of d / 128, |f| <= 64) make values = 128 c + f. The kernel's arithmetic, op for op
    (both planes rounded half to even)."""
    blocks = x.astype(jnp.float32).reshape(x.shape[0], -1, BLOCK)
    d = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / jnp.float32(127.0)
    inverse = jnp.where(d > 0, jnp.float32(1.0) / jnp.where(d > 0, d, 1.0), 0.0)
    coarse = jnp.round(blocks * inverse)
    rest = blocks - coarse * d
    fine = jnp.clip(jnp.round(rest * (inverse * 128.0)), -127, 127)
    values = (128 * coarse.astype(jnp.int32) + fine.astype(jnp.int32))
    unit = d[..., 0] / 128.0
    return values, unit, unit * jnp.sum(values, axis=-1).astype(jnp.float32)


def reference_matmul(x, qweight, scales, mins=None, bf16=False):
    """x [M, K] . dequantize(weights)^T -> float32 [M, N], as the kernels compute it (unstacked weights): from
    FLOAT_MIN_ROWS rows in float32 (with `bf16`, at any rows, both sides rounded to bfloat16 first), below it
    through the ~14-bit activations and exact integer block dots."""
    if bf16 or x.shape[0] >= FLOAT_MIN_ROWS:
        dtype = jnp.bfloat16 if bf16 else jnp.float32
        w = dequantize(qweight, scales, mins).astype(dtype)
        return jnp.dot(jnp.asarray(x).astype(dtype), w.T, preferred_element_type=jnp.float32)
    values, x_scale, x_sum = quantize_activations(x)
    blocks = scales.shape[-1] // TILE
    w = _values(qweight, blocks, mins is not None).astype(jnp.int32)
    dots = jnp.einsum("mbj,nbj->mnb", values, w).astype(jnp.float32)  # exact integers
    y = jnp.sum(dots * (x_scale[:, None, :] * _untile(scales, blocks)[None, :, :, 0]), axis=-1)
    if mins is not None:
        y = y + x_sum @ _untile(mins, blocks)[:, :, 0].T
    return y


def matmul(x, qweight, scales, mins=None, layer=None, rows=None, bf16=False) -> jax.Array:
    """x [M, K] float32 through the kernel -> float32 [M, N]; `layer` picks from stacked weights [L, ...];
    `rows` (int32 [1] or scalar): only x's first `rows` rows are real, the rest come out zero; `bf16`: multiply
    in bfloat16 where the CPU has AVX512-BF16 (block_quant_avx512.cc's panels, at any rows)."""
    n = qweight.shape[-2] * TILE
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    rows = jnp.asarray(x.shape[0] if rows is None else rows, jnp.int32).reshape(())
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    x = x.astype(jnp.float32)
    if mins is None:
        return jax.ffi.ffi_call(Q8_TARGET, out)(x, qweight, scales, layer, rows, bf16=bool(bf16))
    return jax.ffi.ffi_call(Q4_TARGET, out)(x, qweight, scales, mins, layer, rows, bf16=bool(bf16))


def dense_dtype(weights_dtype) -> jnp.dtype:
    """The dtype a many-row step multiplies its unpacked weights in: bfloat16 where the model runs in bfloat16
    (dtype auto on the CPU, as vLLM's CPU build) and the CPU multiplies bfloat16 in hardware, where XLA's
    bfloat16 GEMM is about twice its float32 one; float32 elsewhere (exact x . dequantize(w))."""
    if jnp.dtype(weights_dtype) == jnp.bfloat16 and cpu_kernels.has_fast_bf16_dots():
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


def dequantize_layer(qweight, scales, mins=None, layer=None, dtype=jnp.float32) -> jax.Array:
    """One layer of (possibly stacked) weights dequantized by the kernel -> [N, K] float32 or bfloat16 (the
    float32 values rounded to nearest even)."""
    n, k = qweight.shape[-2] * TILE, scales.shape[-1] // TILE * BLOCK
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    dtype = jnp.dtype(dtype)
    call = jax.ffi.ffi_call(DEQUANTIZE_TARGETS[mins is not None, dtype], jax.ShapeDtypeStruct((n, k), dtype))
    return call(qweight, scales, layer) if mins is None else call(qweight, scales, mins, layer)


def project(x, qweight, scales, mins=None, layer=None, rows=None, dense_dtype=jnp.float32) -> jax.Array:
    """x [M, K] . weights^T -> float32 [M, N], decided at trace time by M: the kernel for decode-sized steps
    (integer dots, or float32 panels from FLOAT_MIN_ROWS live rows), from DENSE_MIN_ROWS rows the layer
    unpacked by the kernel for XLA's float32 dot. With a bfloat16 `dense_dtype` (a CPU with AVX512-BF16), the
    kernel's bfloat16 panels at every size: XLA's bfloat16 dot was ~7% faster from 512 rows, slower below
    256, and would make a long prompt's rows depend on what else shares its step."""
    dense_dtype = jnp.dtype(dense_dtype)
    if x.shape[0] < DENSE_MIN_ROWS or dense_dtype == jnp.bfloat16:
        return matmul(x, qweight, scales, mins, layer, rows, bf16=dense_dtype == jnp.bfloat16)
    w = dequantize_layer(qweight, scales, mins, layer, dense_dtype)
    return jax.lax.dot_general(x.astype(dense_dtype), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
