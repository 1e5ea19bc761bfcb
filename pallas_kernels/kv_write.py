"""Writing this step's new K/V rows into their page slots, as a Pallas kernel.

Same contract as `attention.write_kv` / `reference.ref_write_kv`: k_new/v_new are [T, Hkv, D],
slot_mapping[t] = page * page_size + offset (padded tokens point into scratch page 0), and the
pages come back updated. The pages are aliased input -> output, so under jit with donated
caches the write is in place: only T * Hkv * D elements move, never the cache.

Grid: (token, kv head); each program moves one [head_dim] row of K and one of V. The Triton
lowering needs power-of-two tiles, which head_dim is and num_kv_heads (3 for SmolLM2) may not
be, hence one head per program.

Measured on an H100 (docs/benchmarks.md, "Pallas attention on GPU", bf16, 8 kv heads x 128):
decode-sized writes (64 tokens) tie with XLA's scatter within noise (0.049-0.075 ms, both near
the launch floor); prefill-sized writes are faster with this kernel (2048 tokens: 0.067 vs
0.075 ms; 4096 tokens: 0.059 vs 0.091 ms). Both update donated buffers in place.

GPU (Triton lowering) and interpret mode only: on a TPU the whole-array refs would have to fit in
VMEM, so a TPU path should keep the XLA scatter (or add a scalar-prefetch BlockSpec variant).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from .reference import cast_to_cache


def _write_kv_kernel(slot_ref, k_new_ref, v_new_ref, k_in_ref, v_in_ref, k_out_ref, v_out_ref,
                     *, page_size):
    del k_in_ref, v_in_ref  # aliased to the outputs: the untouched slots keep their values
    token = pl.program_id(0)
    kv_head = pl.program_id(1)
    slot = slot_ref[token]
    page = slot // page_size
    offset = slot % page_size
    k_out_ref[page, offset, kv_head, :] = cast_to_cache(k_new_ref[token, kv_head, :], k_out_ref.dtype)
    v_out_ref[page, offset, kv_head, :] = cast_to_cache(v_new_ref[token, kv_head, :], v_out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",), donate_argnums=(0, 1))
def write_kv_pallas(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Return (k_pages, v_pages) with row t of k_new/v_new written at slot_mapping[t].

    k_pages and v_pages are donated. Padded tokens may share a scratch slot; which of them
    lands there is unspecified (as with the XLA scatter).
    """
    num_tokens, num_kv_heads, _ = k_new.shape
    page_size = k_pages.shape[1]
    kernel = functools.partial(_write_kv_kernel, page_size=page_size)
    return pl.pallas_call(
        kernel,
        grid=(num_tokens, num_kv_heads),
        out_shape=(
            jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
            jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype),
        ),
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
        name="write_kv_pallas",
    )(slot_mapping, k_new, v_new, k_pages, v_pages)
