"""Ragged paged attention as a Mosaic TPU Pallas kernel.

Structure (one pallas_call):
  * grid = (query block b, sequence step j, page step p). Query block b is rows
    [b * bq, (b + 1) * bq) of the flat token batch; it holds tokens of the consecutive sequences
    first_seq[b] .. last_seq[b] (computed in the wrapper and scalar-prefetched with kv_lens,
    cu_q_lens, the flattened page table and num_seqs). Step j visits sequence first_seq[b] + j and
    step p its p-th *needed* page (from the sliding-window start to the causal end of this
    block's rows of that sequence).
  * The page table drives the K/V BlockSpec index maps: the block for (b, j, p) is physical page
    page_indices[seq, first_page + p]. The Pallas TPU pipeline therefore DMAs pages HBM -> VMEM
    double-buffered (page p + 1 is in flight while page p is computed). Steps with no work clamp
    their index to the previous step's page, so they issue no DMA.
  * Online softmax in VMEM scratch (running max, running sum, accumulator per query head); a row
    only updates while its own sequence is visited, so rows of different sequences share a block.
    The output block is written once, at the block's last step.

The query block is [bq, num_heads, head_dim] and a page is [page_size, num_kv_heads, head_dim]:
both keep the full trailing dims, which Mosaic requires of block shapes that are not multiples
of (8, 128). Each query head is a 2-D [bq, D] x [D, page_size] matmul against its KV head.

Costs/limits: one page per grid step (JAX's production kernel batches several pages per DMA);
grid steps without work still cost a step's overhead (~0.35 us) although they move no data.
Only run here with interpret=True (CPU tests); it has not been compiled on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MASK_VALUE = -1e30  # finite: a fully masked page must not turn the running max into NaN


class _Metadata:
    """Per (query block, sequence step, page step) scalars, shared by index maps and the kernel."""

    def __init__(self, b, j, p, kv_lens, page_indices, cu_q_lens, num_seqs, first_seq, last_seq,
                 *, bq, page_size, pages_per_seq, sliding_window):
        self.has_seq = first_seq[b] + j <= last_seq[b]
        self.seq = jnp.minimum(first_seq[b] + j, last_seq[b])
        seq = self.seq
        q_start, q_end = cu_q_lens[seq], cu_q_lens[seq + 1]
        self.q_start = q_start
        self.q_len = q_end - q_start
        self.kv_len = kv_lens[seq]
        # This block's rows of `seq` are tokens [tok_lo, tok_hi] of the flat batch.
        tok_lo = jnp.maximum(q_start, b * bq)
        tok_hi = jnp.minimum(q_end, (b + 1) * bq) - 1
        context = self.kv_len - self.q_len - q_start  # position = token + context
        kv_end = tok_hi + context + 1
        kv_begin = 0
        if sliding_window is not None:
            kv_begin = jnp.maximum(tok_lo + context - sliding_window + 1, 0)
        self.first_page = kv_begin // page_size
        end_page = jnp.minimum((kv_end + page_size - 1) // page_size, pages_per_seq)
        self.has_work = (self.has_seq & (seq < num_seqs[0]) & (tok_lo <= tok_hi)
                         & (self.first_page + p < end_page))
        self.page_in_seq = jnp.clip(self.first_page + p, 0, jnp.maximum(end_page - 1, 0))
        self.page = page_indices[seq * pages_per_seq + self.page_in_seq]


def _kv_index_map(b, j, p, *scalars, meta_kwargs):
    return (_Metadata(b, j, p, *scalars, **meta_kwargs).page, 0, 0, 0)


def _attention_kernel(
    kv_lens_ref, page_indices_ref, cu_q_lens_ref, num_seqs_ref, first_seq_ref, last_seq_ref,
    q_ref, k_ref, v_ref,
    o_ref,
    max_ref, sum_ref, acc_ref,
    *, sm_scale, soft_cap, sliding_window, group, meta_kwargs,
):
    b, j, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, num_heads, _ = q_ref.shape
    page_size = k_ref.shape[0]
    meta = _Metadata(b, j, p, kv_lens_ref, page_indices_ref, cu_q_lens_ref, num_seqs_ref,
                     first_seq_ref, last_seq_ref, **meta_kwargs)

    @pl.when((j == 0) & (p == 0))
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, MASK_VALUE, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(meta.has_work)
    def _accumulate():
        token = b * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, page_size), 0)
        row_in_seq = (token >= meta.q_start) & (token < meta.q_start + meta.q_len)
        pos = token - meta.q_start + meta.kv_len - meta.q_len
        kv_pos = meta.page_in_seq * page_size + jax.lax.broadcasted_iota(
            jnp.int32, (bq, page_size), 1)
        visible = row_in_seq & (kv_pos <= pos)
        if sliding_window is not None:
            visible &= kv_pos > pos - sliding_window
        row_update = row_in_seq[:, :1]  # [bq, 1]: rows of other sequences keep their state
        precision = jax.lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
        for head in range(num_heads):  # static unroll: 2-D matmuls Mosaic lowers directly
            kv_head = head // group
            q = q_ref[:, head, :]
            k = k_ref[:, kv_head, :]
            v = v_ref[:, kv_head, :]
            if k.dtype.itemsize == 1:  # a float8 cache: widened to the queries' dtype for the dots
                k, v = k.astype(q.dtype), v.astype(q.dtype)
            scores = jax.lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), precision=precision,
                preferred_element_type=jnp.float32) * sm_scale
            if soft_cap is not None:
                scores = soft_cap * jnp.tanh(scores / soft_cap)
            scores = jnp.where(visible, scores, MASK_VALUE)
            old_max = max_ref[head]
            new_max = jnp.maximum(old_max, jnp.max(scores, axis=1, keepdims=True))
            rescale = jnp.exp(old_max - new_max)
            probs = jnp.exp(scores - new_max)
            new_sum = sum_ref[head] * rescale + jnp.sum(probs, axis=1, keepdims=True)
            pv = jax.lax.dot_general(
                probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                preferred_element_type=jnp.float32)
            new_acc = acc_ref[head] * rescale + pv
            max_ref[head] = jnp.where(row_update, new_max, old_max)
            sum_ref[head] = jnp.where(row_update, new_sum, sum_ref[head])
            acc_ref[head] = jnp.where(row_update, new_acc, acc_ref[head])

    @pl.when((j == pl.num_programs(1) - 1) & (p == pl.num_programs(2) - 1))
    def _finish():
        for head in range(num_heads):
            total = sum_ref[head]
            # Rows never visited (padding tokens) have total == 0 and acc == 0: they stay zero.
            out = acc_ref[head] / jnp.where(total == 0.0, 1.0, total)
            o_ref[:, head, :] = out.astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "queries_per_block", "interpret"),
)
def ragged_paged_attention_tpu(
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
    queries_per_block: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """[T, H, D] ragged paged attention; same semantics as `reference.ref_ragged_paged_attention`."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    num_seq_slots, pages_per_seq = page_indices.shape
    bq = queries_per_block or min(128, max(8, pl.next_power_of_2(num_tokens)))
    num_blocks = pl.cdiv(num_tokens, bq)
    padded_tokens = num_blocks * bq
    q_padded = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))

    # Which sequences each query block touches. Blocks past the live tokens get first > last
    # (no work); padded sequence slots are never inside [first, last].
    live_tokens = cu_q_lens[num_seqs[0]]
    block_start = jnp.arange(num_blocks, dtype=jnp.int32) * bq
    block_last = jnp.minimum(block_start + bq, live_tokens) - 1
    seq_of = lambda t: jnp.searchsorted(cu_q_lens, t, side="right").astype(jnp.int32) - 1
    first_seq = jnp.clip(seq_of(block_start), 0, num_seq_slots - 1)
    last_seq = jnp.where(block_start < live_tokens,
                         jnp.clip(seq_of(block_last), 0, num_seq_slots - 1), first_seq - 1)
    scalars = (kv_lens, page_indices.reshape(-1), cu_q_lens, num_seqs, first_seq, last_seq)

    meta_kwargs = dict(bq=bq, page_size=page_size, pages_per_seq=pages_per_seq,
                       sliding_window=sliding_window)
    kv_map = functools.partial(_kv_index_map, meta_kwargs=meta_kwargs)
    q_spec = pl.BlockSpec((bq, num_heads, head_dim), lambda b, j, p, *_: (b, 0, 0))
    kv_spec = pl.BlockSpec((None, page_size, num_kv_heads, head_dim), kv_map)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(num_blocks, num_seq_slots, pages_per_seq),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        scratch_shapes=[
            pltpu.VMEM((num_heads, bq, 1), jnp.float32),
            pltpu.VMEM((num_heads, bq, 1), jnp.float32),
            pltpu.VMEM((num_heads, bq, head_dim), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _attention_kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        group=num_heads // num_kv_heads, meta_kwargs=meta_kwargs,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q_padded.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(*scalars, q_padded, k_pages, v_pages)
    return out[:num_tokens]
