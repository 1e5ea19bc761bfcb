"""Projections over block-quantized weights: GGUF's Q4_0 / Q4_1 / Q4_K / Q8_0 tensors kept in 32-value blocks.

A decode step on the CPU is a stream of weights: a 4-bit block streams 0.75 bytes per weight against
bfloat16's 2. The kernels (block_quant.cc, built with cpu_kernels.py's library) unpack the blocks as they go
and multiply in float32 (or, on CPUs with AVX512-BF16 and a bfloat16 model, in bfloat16 with float32 sums:
in AMX tiles where the CPU has them), with the same sums for a row whatever else shares its step.

Three formats, a row of 32-value blocks per output (GGUF's own rows), interleaved in tiles of TILE rows block
by block so the kernel reads each array as one sequential stream:
- "q4": `qweight` uint8 [N/TILE, K/32 * TILE * 16] (byte j of a block: value j low nibble, value j + 16 high),
  `scales` and `mins` float32 [N/TILE, K/32 * TILE]; w = scale * q + min with q in [0, 15]. Q4_0 is the
  same with min = -8 * scale; Q4_K's sub-blocks are these blocks with their scales and mins multiplied out.
- "q8": `qweight` int8 [N/TILE, K/32 * TILE * 32], `scales` as above; w = scale * q.
- "bf16_blocks": `qweight` uint16 [N/TILE, K/32 * TILE * 32], a bfloat16 model's weights as they are (their bits), no
  scales: on the CPU a bfloat16 checkpoint's projections take the same loops as GGUF's blocks, and with them
  the same sums for a row whatever else shares its step.
Any of them may be stacked over layers ([L, ...]); `layer` then picks one in place.

`reference_matmul` is the pure-JAX oracle: x . dequantize(w) (both rounded to bfloat16 first, for bf16).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernels

BLOCK = 32
TILE = 2
Q4_TARGET, Q8_TARGET, BF16_TARGET = "jaxserve_q4_matmul", "jaxserve_q8_matmul", "jaxserve_bf16_block_matmul"

# GGUF block types -> (our format, bytes per GGUF block). Q4_K's 256-value super-blocks hold eight 32-value
# sub-blocks, each with its own 6-bit scale and min: exactly "q4" blocks once unpacked.
GGUF_FORMATS = {"Q4_0": ("q4", 18), "Q4_1": ("q4", 20), "Q8_0": ("q8", 34), "Q4_K": ("q4", 144)}


def format_of(gguf_type_name: str) -> str | None:
    """"q4" / "q8" for the GGUF block types kept as blocks, None for the rest (they dequantize)."""
    entry = GGUF_FORMATS.get(gguf_type_name)
    return entry[0] if entry else None


def pack_gguf(raw: np.ndarray, gguf_type_name: str) -> dict[str, np.ndarray]:
    """One GGUF tensor's raw bytes [N, gguf_blocks * block_bytes] -> row-major {"qweight" [N, blocks, bytes],
    "scales" [N, blocks][, "mins"]} of 32-value blocks; `tile` then interleaves the rows for the kernels."""
    _, block_bytes = GGUF_FORMATS[gguf_type_name]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, block_bytes)
    half = lambda first: blocks[:, :, first:first + 2].copy().view(np.float16)[..., 0].astype(np.float32)
    if gguf_type_name == "Q4_K":
        return _pack_q4_k(blocks, half(0), half(2))
    scale = half(0)
    if gguf_type_name == "Q8_0":
        return {"qweight": blocks[:, :, 2:].copy().view(np.int8), "scales": scale}
    if gguf_type_name == "Q4_1":
        mins, nibbles = half(2), blocks[:, :, 4:]
    else:  # Q4_0: w = scale * (q - 8)
        mins, nibbles = -8.0 * scale, blocks[:, :, 2:]
    return {"qweight": np.ascontiguousarray(nibbles), "scales": scale, "mins": mins}


def _pack_q4_k(blocks: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> dict[str, np.ndarray]:
    """Q4_K super-blocks [N, S, 144] (d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles) as
    8 * S "q4" blocks a row: sub-block j's w = (d * scale_j) * q - dmin * min_j, as GGUF dequantizes it."""
    n, supers = blocks.shape[:2]
    packed = blocks[:, :, 4:16]
    low, high, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    # Sub-blocks 0-3 keep their six bits in bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take four low
    # bits from bytes 8-11 and their top two from the spare top bits of bytes 0-7.
    scale6 = np.concatenate([low & 63, (rest & 15) | ((low >> 6) << 4)], axis=-1).astype(np.float32)
    min6 = np.concatenate([high & 63, (rest >> 4) | ((high >> 6) << 4)], axis=-1).astype(np.float32)
    # 32 bytes per pair of sub-blocks: the low nibbles are the first's 32 values, the high ones the second's.
    pairs = blocks[:, :, 16:].reshape(n, supers, 4, 1, 32)
    values = (pairs >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15  # [N, S, 4, 2, 32]
    values = values.reshape(n, supers * 8, 32)
    nibbles = values[..., :16] | (values[..., 16:] << 4)  # byte i: value i low, value i + 16 high
    return {"qweight": np.ascontiguousarray(nibbles, dtype=np.uint8),
            "scales": (d[..., None] * scale6).reshape(n, -1), "mins": -(dmin[..., None] * min6).reshape(n, -1)}


def pack_bf16(weight) -> dict[str, np.ndarray]:
    """A weight [N, K] (float32 or bfloat16; K a multiple of 32) -> row-major {"qweight": uint16 [N, blocks, 32]},
    its values rounded to bfloat16 (to nearest even, as XLA's convert) and kept as their bits."""
    n, k = weight.shape
    bits = np.asarray(weight).astype(jnp.bfloat16).view(np.uint16)
    return {"qweight": np.ascontiguousarray(bits).reshape(n, k // BLOCK, BLOCK)}


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
    """The values [..., N, blocks, 32] of tiled weights (uint8 0..15, int8, or float32 from bfloat16 bits)."""
    q = _untile(qweight, blocks)
    xp = np if isinstance(q, np.ndarray) else jnp
    if q.dtype == np.uint16:  # bfloat16 bits: the upper half of a float32's
        return (q.astype(np.uint32) << 16).view(np.float32) if xp is np else jax.lax.bitcast_convert_type(
            q.astype(jnp.uint32) << 16, jnp.float32)
    if not four_bit:
        return q
    return xp.concatenate([q & 0x0F, q >> 4], axis=-1)


def dequantize(qweight, scales=None, mins=None):
    """Tiled weights -> float32 [..., N, K] (jax or numpy): a test's oracle. No scales: bfloat16 blocks."""
    if scales is None:
        values = _values(qweight, qweight.shape[-1] // (TILE * BLOCK), False)
        return values.reshape(*values.shape[:-2], -1)
    blocks = scales.shape[-1] // TILE
    values = _values(qweight, blocks, mins is not None).astype(np.float32)
    out = values * _untile(scales, blocks)
    if mins is not None:
        out = out + _untile(mins, blocks)
    return out.reshape(*out.shape[:-2], -1)


def lookup_rows(qweight, scales, mins, ids):
    """Rows `ids` of tiled weights [N/TILE, ...] dequantized -> float32 [len(ids), K] (an embedding lookup):
    each id's tile is dequantized and its row picked."""
    tiles = [None if a is None else jnp.take(a, ids // TILE, axis=0) for a in (qweight, scales, mins)]
    rows = dequantize(*tiles).reshape(ids.shape[0], TILE, -1)  # [T, TILE, K]
    return jnp.take_along_axis(rows, (ids % TILE)[:, None, None], axis=1)[:, 0]


def reference_matmul(x, qweight, scales=None, mins=None, bf16=False):
    """x [M, K] . dequantize(weights)^T -> float32 [M, N], as the kernels compute it (unstacked weights) up to
    the order of the float32 sums; with `bf16`, both sides rounded to bfloat16 first."""
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    w = dequantize(qweight, scales, mins).astype(dtype)
    return jnp.dot(jnp.asarray(x).astype(dtype), w.T, preferred_element_type=jnp.float32)


def matmul(x, qweight, scales=None, mins=None, layer=None, rows=None, bf16=False, gated=False,
           paired_out=False, num_rows=None, argmax=False) -> jax.Array:
    """x [M, K] float32 through the kernel -> float32 [M, N]; `layer` picks from stacked weights [L, ...];
    `rows` (int32 [1] or scalar): only x's first `rows` rows are real, the rest come out zero; `bf16`: multiply
    in bfloat16 where the CPU has AVX512-BF16 (block_quant_avx512.cc's panels, at any rows; 4- and 8-bit
    blocks). No scales: bfloat16 blocks, multiplied in float32, or with `bf16` in AMX tiles where the CPU has
    them (block_quant_amx.cc). `gated` (a fused gate/up projection): [M, N / 2] = silu(the first N / 2
    outputs) * the rest, in the AMX panels' store where they run, each output's sums those of the ungated call.
    `paired_out` (gated, `bf16`, on AMX CPUs only: amx_fits): those activations as the next projection's AMX
    B tiles instead, uint32 [ceil(M / 16), N / 64, 16, 16] (bfloat16 pairs), which that projection takes as its x
    (`num_rows`: its M); the same values as passing the float32 activations on. `argmax` (`bf16`, AMX CPUs:
    amx_fits): int32 [M], each row's first largest output (N - 1 for a row with a NaN), as the sampler's greedy
    token of the float32 result, which is never written (an LM head's logits)."""
    n = qweight.shape[-2] * TILE
    paired_in = x.dtype == jnp.uint32
    m = num_rows if paired_in else x.shape[0]
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    rows = jnp.asarray(m if rows is None else rows, jnp.int32).reshape(())
    if paired_out:
        out = jax.ShapeDtypeStruct((-(-m // 16), n // 2 // BLOCK, 16, 16), jnp.uint32)
    elif argmax:
        out = jax.ShapeDtypeStruct((m,), jnp.int32)
    else:
        out = jax.ShapeDtypeStruct((m, n // 2 if gated else n), jnp.float32)
    if not paired_in:
        x = x.astype(jnp.float32)
    flags = dict(bf16=bool(bf16), gated=bool(gated), paired_in=paired_in, paired_out=bool(paired_out),
                 argmax=bool(argmax))
    if scales is None:
        return jax.ffi.ffi_call(BF16_TARGET, out)(x, qweight, layer, rows, **flags)
    if mins is None:
        return jax.ffi.ffi_call(Q8_TARGET, out)(x, qweight, scales, layer, rows, **flags)
    return jax.ffi.ffi_call(Q4_TARGET, out)(x, qweight, scales, mins, layer, rows, **flags)


def amx_fits(width: int) -> bool:
    """Whether `width` outputs can take matmul's AMX-only options (`paired_out` activations, `argmax`): the
    kernels run in AMX tiles here and the width is whole blocks."""
    return width % BLOCK == 0 and cpu_kernels.available() and cpu_kernels.has_amx_tiles()


def bf16_blocks_multiply_dtype(weights_dtype) -> jnp.dtype:
    """The dtype bfloat16 blocks multiply in: bfloat16 in AMX tiles where the CPU has them and the model runs
    in bfloat16 (the weights need no unpacking there, so only the tiles' rate counts), else float32 (exact
    x . w, the float32 loops)."""
    if jnp.dtype(weights_dtype) == jnp.bfloat16 and cpu_kernels.has_amx_tiles():
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


def multiply_dtype(weights_dtype) -> jnp.dtype:
    """The dtype the kernels multiply in (matmul's `bf16`): bfloat16 where the model runs in bfloat16 (dtype
    auto on the CPU, as vLLM's CPU build) and the CPU multiplies bfloat16 in hardware, at twice the float32
    FMA rate; float32 elsewhere (exact x . dequantize(w))."""
    if jnp.dtype(weights_dtype) == jnp.bfloat16 and cpu_kernels.has_fast_bf16_dots():
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)
