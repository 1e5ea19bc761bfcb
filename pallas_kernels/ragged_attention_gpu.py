"""Ragged paged attention as a Pallas kernel for NVIDIA GPUs (Triton lowering).

Why the Triton lowering and not Mosaic GPU (jax 0.12):
  * The work is a paged *gather*: each KV page sits at a data-dependent page index, query
    tiles start at data-dependent token offsets and end mid-tile. Triton-lowered Pallas does
    this with plain dynamic ref indexing plus masked loads/stores; the whole array stays in
    global memory and Triton's own pipeliner overlaps the page loads.
  * Decode tiles are tiny (a handful of query rows per sequence). Triton pads a dot to 16
    rows; Mosaic GPU's wgmma wants 64-row warpgroup tiles and TMA-aligned, swizzled shared
    memory boxes, which fit prefill but waste 4x on decode and make the ragged edges
    (partial pages, partial query tiles) hand-written TMA bookkeeping.
  * The same kernel body runs under `interpret=True` on the CPU (the generic Pallas
    interpreter), so the tests exercise the exact code that compiles on the GPU.
  * jax 0.12 marks the Pallas Triton backend deprecated (it warns) in favour of Mosaic GPU;
    it still compiles and runs on H100 (see docs/benchmarks.md). Moving to Mosaic GPU is the
    follow-up once its ragged/gather story settles; the interface would not change.

Layout trick for GQA: the G = num_heads // num_kv_heads query heads that share a KV head are
packed into the row dimension, q[T, H, D] -> q_rows[Hkv, T * G, D] (row = token * G + g), so
one program loads each K/V page once for all G heads and the dot has G x more rows.

Grid: (sequence, row tile, kv head). A program with no rows (padded sequence, or a row tile
past the sequence's q_len * G rows) exits at once; GPU programs that do nothing are cheap.
Each program walks only the pages its rows can see (causal end, sliding-window start).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASK_VALUE = -1e30  # finite: a fully masked page must not turn the running max into NaN


def _dot(a, b, *, contract_b, precision):
    """2-D a @ b (contract_b=0) or a @ b.T (contract_b=1), accumulated in float32.

    Written with lax.dot_general because `pl.dot` is gone in jax 0.12 and the Triton lowering
    maps dot_general straight onto tl.dot.
    """
    return jax.lax.dot_general(
        a, b, (((1,), (contract_b,)), ((), ())),
        precision=precision, preferred_element_type=jnp.float32,
    )


def _attention_kernel(
    kv_lens_ref, page_indices_ref, cu_q_lens_ref, num_seqs_ref,
    q_ref, k_pages_ref, v_pages_ref,
    o_ref,
    *, sm_scale, sliding_window, soft_cap, group, rows_per_tile, page_size, precision,
):
    seq = pl.program_id(0)
    row_tile = pl.program_id(1)
    kv_head = pl.program_id(2)

    q_start = cu_q_lens_ref[seq]
    q_len = cu_q_lens_ref[seq + 1] - q_start
    kv_len = kv_lens_ref[seq]
    first_row = row_tile * rows_per_tile
    has_rows = (seq < num_seqs_ref[0]) & (first_row < q_len * group)

    @pl.when(has_rows)
    def _():
        rows = first_row + jnp.arange(rows_per_tile, dtype=jnp.int32)
        row_valid = rows < q_len * group
        token_in_seq = rows // group
        pos = kv_len - q_len + token_in_seq  # absolute KV position of each row's token

        # Rows are padded by rows_per_tile in the wrapper, so this slice never runs off the end.
        q_tile = q_ref.at[kv_head, pl.ds(q_start * group + first_row, rows_per_tile), :]
        q = plgpu.load(q_tile, mask=row_valid[:, None], other=0.0)

        last_token = jnp.minimum((first_row + rows_per_tile - 1) // group, q_len - 1)
        kv_end = kv_len - q_len + last_token + 1  # one past the furthest visible position
        kv_begin = 0
        if sliding_window is not None:
            kv_begin = jnp.maximum(kv_len - q_len + first_row // group - sliding_window + 1, 0)
        first_page = kv_begin // page_size
        end_page = (kv_end + page_size - 1) // page_size

        def visit_page(page_in_seq, carry):
            running_max, running_sum, acc = carry
            page = page_indices_ref[seq, page_in_seq]
            k = k_pages_ref[page, :, kv_head, :]  # [page_size, D]
            v = v_pages_ref[page, :, kv_head, :]
            if k.dtype.itemsize == 1:  # a float8 cache: widened to the queries' dtype for the dots
                k, v = k.astype(q.dtype), v.astype(q.dtype)
            scores = _dot(q, k, contract_b=1, precision=precision) * sm_scale
            if soft_cap is not None:
                scores = soft_cap * jnp.tanh(scores / soft_cap)
            kv_pos = page_in_seq * page_size + jnp.arange(page_size, dtype=jnp.int32)
            visible = kv_pos[None, :] <= pos[:, None]
            if sliding_window is not None:
                visible &= kv_pos[None, :] > pos[:, None] - sliding_window
            scores = jnp.where(visible, scores, MASK_VALUE)

            new_max = jnp.maximum(running_max, jnp.max(scores, axis=1))
            rescale = jnp.exp(running_max - new_max)
            probs = jnp.exp(scores - new_max[:, None])
            running_sum = running_sum * rescale + jnp.sum(probs, axis=1)
            acc = acc * rescale[:, None] + _dot(
                probs.astype(v.dtype), v, contract_b=0, precision=precision
            )
            return new_max, running_sum, acc

        head_dim = q.shape[-1]
        init = (
            jnp.full((rows_per_tile,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows_per_tile,), jnp.float32),
            jnp.zeros((rows_per_tile, head_dim), jnp.float32),
        )
        _, running_sum, acc = jax.lax.fori_loop(first_page, end_page, visit_page, init)
        out = acc / jnp.where(running_sum == 0.0, 1.0, running_sum)[:, None]
        o_tile = o_ref.at[kv_head, pl.ds(q_start * group + first_row, rows_per_tile), :]
        plgpu.store(o_tile, out.astype(o_ref.dtype), mask=row_valid[:, None])


def _rows_per_tile(num_tokens: int, group: int) -> int:
    # Triton dots want >= 16 rows; 64 rows keep prefill tiles busy without starving decode.
    return max(16, min(64, pl.next_power_of_2(num_tokens * group)))


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "rows_per_tile", "num_warps",
                     "num_stages", "interpret"),
)
def ragged_paged_attention_gpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    rows_per_tile: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """[T, H, D] ragged paged attention; same semantics as `reference.ref_ragged_paged_attention`.

    On a real GPU, page_size, head_dim and rows_per_tile must be powers of two >= 16 (Triton
    dot tiles). `interpret=True` runs the same kernel on the CPU for tests (slow).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    num_seq_slots = page_indices.shape[0]
    if rows_per_tile is None:
        rows_per_tile = _rows_per_tile(num_tokens, group)
    num_rows = num_tokens * group

    # [T, H, D] -> [Hkv, T*G, D] (row = token * G + g), padded so row tiles never run past the end.
    q_rows = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    q_rows = q_rows.reshape(num_kv_heads, num_rows, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, rows_per_tile), (0, 0)))

    precision = (jax.lax.Precision.HIGHEST if q.dtype == jnp.float32
                 else jax.lax.Precision.DEFAULT)
    kernel = functools.partial(
        _attention_kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        group=group, rows_per_tile=rows_per_tile, page_size=page_size, precision=precision,
    )
    grid = (num_seq_slots, pl.cdiv(num_rows, rows_per_tile), num_kv_heads)
    out_rows = pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(kv_lens, page_indices, cu_q_lens, num_seqs, q_rows, k_pages, v_pages)

    out = out_rows[:, :num_rows].reshape(num_kv_heads, num_tokens, group, head_dim)
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, head_dim)
    # Rows no program stored (padding tokens) are undefined: zero them explicitly.
    live = jnp.arange(num_tokens) < cu_q_lens[num_seqs[0]]
    return jnp.where(live[:, None, None], out, jnp.zeros((), out.dtype))
