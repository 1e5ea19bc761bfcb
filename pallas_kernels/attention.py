"""The one attention entry point models call: ragged paged attention over a paged KV cache.

`backend` is chosen once per engine (not per call site): "xla" is the pure-JAX path; "cpu" serves on the
CPU through the hand-written kernel (cpu_kernels) where its shapes fit, else through the XLA path; "pallas"
dispatches to the TPU or GPU kernel for the current platform. Semantics are documented in
docs/design.md ("Attention boundary").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import cpu_kernels
from .reference import cast_to_cache

# Queries processed together against one sequence's KV in the XLA path. Decode-only batches use 1
# (one token per sequence); mixed batches use a block so a prefill chunk shares each gathered KV chunk.
MIXED_QUERY_BLOCK = 8
# Tokens of KV gathered per loop iteration in the XLA path: for mixed steps, and for decode steps the
# budget of gathered tokens over all sequences (measured on a 2-core CPU, 30 layers, 192-token contexts:
# 32 sequences took 94 ms with 256-token chunks, 55-67 ms with 64-128; gathers that overflow the cache lose).
KV_CHUNK_TOKENS = 256
DECODE_GATHER_TOKENS = 2048


def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping, backend: str = "xla"):
    """Scatter this step's K/V ([T, Hkv, D]) into their slots (cast_to_cache: float8 saturates); padded
    tokens target scratch page 0."""
    num_pages, page_size, hkv, d = k_pages.shape

    def write(pages, new):
        new = cast_to_cache(new, pages.dtype)
        if backend == "cpu" and pages.dtype.itemsize == 1 and cpu_kernels.available():
            # XLA CPU would scatter float8 by widening the whole cache to float16 and back, every step
            return cpu_kernels.write_rows(pages, new, slot_mapping)
        # Slots are always in range (padding targets page 0).
        flat = pages.reshape(num_pages * page_size, hkv, d)
        return flat.at[slot_mapping].set(new, mode="promise_in_bounds").reshape(pages.shape)

    return write(k_pages, k_new), write(v_pages, v_new)


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, backend: str = "xla",
                           interpret: bool = False, query_block: int | None = None, mesh=None):
    """`mesh`: under tensor parallelism (a 1-D mesh splitting the KV heads), the Pallas kernel runs once per
    device on its own KV heads and their query heads; XLA cannot partition a kernel call by itself."""
    if backend == "pallas":
        kernel = functools.partial(_pallas_attention, sm_scale=sm_scale, sliding_window=sliding_window,
                                   soft_cap=soft_cap, interpret=interpret)
        if mesh is not None and mesh.size > 1:
            kernel = _per_kv_head_shard(kernel, mesh)
        return kernel(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if backend not in ("xla", "cpu"):
        raise ValueError(f"unknown attention backend {backend!r}; expected 'xla', 'cpu' or 'pallas'")
    if backend == "cpu" and cpu_kernels.attention_fits(q, k_pages) and cpu_kernels.available():
        return cpu_kernels.ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                                  sm_scale=sm_scale, sliding_window=sliding_window,
                                                  soft_cap=soft_cap)
    if query_block is None:
        decode_only = q.shape[0] <= page_indices.shape[0]  # at most one token per sequence slot
        query_block = 1 if decode_only else MIXED_QUERY_BLOCK
    return xla_ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                      sm_scale=sm_scale, sliding_window=sliding_window,
                                      soft_cap=soft_cap, query_block=query_block)


def _per_kv_head_shard(kernel, mesh):
    """The kernel mapped over the mesh: heads contiguous per device, so each holds whole GQA groups."""
    from jax.sharding import PartitionSpec as P

    axis = mesh.axis_names[0]
    heads, pages, replicated = P(None, axis, None), P(None, None, axis, None), P()
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads, pages, pages) + (replicated,) * 4,
                         out_specs=heads, check_vma=False)


def _pallas_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
                      sliding_window, soft_cap, interpret):
    platform = jax.devices()[0].platform
    if platform == "tpu":
        from .ragged_attention_tpu import ragged_paged_attention_tpu as kernel
    else:
        from .ragged_attention_gpu import ragged_paged_attention_gpu as kernel
    # On the CPU a Pallas kernel can only run in the interpreter (tests, small shapes).
    interpret = interpret or platform == "cpu"
    return kernel(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                  sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret)


def xla_ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                               sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None, query_block: int = 1):
    """Blocked online-softmax attention in plain XLA.

    Queries are cut into blocks of `query_block` tokens that each belong to one sequence; every block
    walks its sequence's pages in chunks of KV_CHUNK_TOKENS (a dynamic-length loop, so cost follows the
    longest live sequence, not the page-table width).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_slots, pages_per_seq = page_indices.shape
    group = num_heads // num_kv_heads
    bq = query_block
    num_blocks = num_tokens if bq == 1 else num_tokens // bq + num_slots

    slot = jnp.arange(num_slots)
    q_lens = jnp.where(slot < num_seqs[0], cu_q_lens[1:] - cu_q_lens[:-1], 0)
    blocks_per_seq = (q_lens + bq - 1) // bq
    block_ends = jnp.cumsum(blocks_per_seq)
    block = jnp.arange(num_blocks)
    block_seq = jnp.minimum(jnp.searchsorted(block_ends, block, side="right"), num_slots - 1)
    block_in_seq = block - (block_ends[block_seq] - blocks_per_seq[block_seq])
    block_live = block < block_ends[-1]

    row = jnp.arange(bq)
    offset_in_seq = block_in_seq[:, None] * bq + row[None, :]  # [NB, bq]
    row_live = block_live[:, None] & (offset_in_seq < q_lens[block_seq][:, None])
    token = jnp.where(row_live, cu_q_lens[block_seq][:, None] + offset_in_seq, num_tokens)
    q_pos = kv_lens[block_seq][:, None] - q_lens[block_seq][:, None] + offset_in_seq  # [NB, bq]

    qb = q.at[jnp.minimum(token, num_tokens - 1)].get()  # [NB, bq, H, D]
    qb = qb.reshape(num_blocks, bq, num_kv_heads, group, head_dim).astype(jnp.float32) * sm_scale
    seq_pages = page_indices[block_seq]  # [NB, P]

    chunk_tokens = KV_CHUNK_TOKENS if bq > 1 else max(page_size, min(KV_CHUNK_TOKENS, DECODE_GATHER_TOKENS // num_blocks))
    chunk_pages = max(1, min(pages_per_seq, 1 << (chunk_tokens // page_size).bit_length() - 1))
    num_chunks_static = -(-pages_per_seq // chunk_pages)
    pad = num_chunks_static * chunk_pages - pages_per_seq
    if pad:
        seq_pages = jnp.pad(seq_pages, ((0, 0), (0, pad)))
    chunk_tokens = chunk_pages * page_size
    max_kv = jnp.max(jnp.where(row_live, q_pos + 1, 0))
    num_chunks = (max_kv + chunk_tokens - 1) // chunk_tokens

    def body(c, carry):
        m, l, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(seq_pages, c * chunk_pages, chunk_pages, axis=1)
        k = k_pages[pages].reshape(num_blocks, chunk_tokens, num_kv_heads, head_dim)
        v = v_pages[pages].reshape(num_blocks, chunk_tokens, num_kv_heads, head_dim)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qb, k.astype(jnp.float32))
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = c * chunk_tokens + jnp.arange(chunk_tokens)
        visible = kv_pos[None, None, :] <= q_pos[:, :, None]  # [NB, bq, K]
        if sliding_window is not None:
            visible &= kv_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        visible &= row_live[:, :, None]
        s = jnp.where(visible[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        correction = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p, v.astype(jnp.float32))
        return m_new, l, acc

    shape = (num_blocks, num_kv_heads, group, bq)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [NB, Hkv, G, bq, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(num_blocks * bq, num_heads, head_dim)
    result = jnp.zeros((num_tokens, num_heads, head_dim), q.dtype)
    return result.at[token.reshape(-1)].set(out.astype(q.dtype), mode="drop")
