"""Pure-JAX reference for ragged paged attention and the KV write.

This is the oracle the Pallas kernels are tested against, so it favours being obviously
correct over being fast: every query token gathers the *whole* page table of its sequence,
builds the full score row and masks it. Memory is O(T * pages_per_seq * page_size), which is
fine for tests and far too much for serving (the lead's XLA path in `attention.py` serves).

Semantics (docs/design.md, "Attention boundary"):
  * tokens of sequence s are q[cu_q_lens[s]:cu_q_lens[s+1]]; only s < num_seqs[0] are live;
  * query token i of s sits at position kv_lens[s] - q_len[s] + i and sees KV positions
    p <= pos (and p > pos - sliding_window when a window is set);
  * soft_cap: scores = soft_cap * tanh(scores / soft_cap), applied before masking;
  * GQA: query head j reads KV head j // (num_heads // num_kv_heads);
  * rows of tokens at or beyond cu_q_lens[num_seqs[0]] are zeros;
  * new K/V rows are cast to the cache's dtype, saturating for float8 caches (see cast_to_cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite so that a fully-masked row never produces NaN (it only happens for padded rows,
# which are zeroed afterwards).
MASK_VALUE = -1e30


def cast_to_cache(x: jax.Array, dtype) -> jax.Array:
    """x in the KV cache's dtype. float8 values saturate at the format's largest finite value (as vLLM's fp8
    cache stores them, with a scale of 1): a plain cast turns float8_e4m3fn's overflow into NaN."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 1:
        largest = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -largest, largest)
    return x.astype(dtype)


def token_layout(cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int):
    """Per flat token: its sequence id, its index inside that sequence, and whether it is live."""
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    live_tokens = cu_q_lens[num_seqs[0]]
    # Sequence s owns [cu[s], cu[s+1]); side="right" gives the last s with cu[s] <= t.
    seq = jnp.searchsorted(cu_q_lens, token, side="right").astype(jnp.int32) - 1
    seq = jnp.clip(seq, 0, cu_q_lens.shape[0] - 2)
    index_in_seq = token - cu_q_lens[seq]
    live = token < live_tokens
    return seq, index_in_seq, live


def ref_ragged_paged_attention(
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
) -> jax.Array:
    """[T, H, D] attention output; see the module docstring for the exact semantics."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    pages_per_seq = page_indices.shape[1]
    max_kv = pages_per_seq * page_size

    seq, index_in_seq, live = token_layout(cu_q_lens, num_seqs, num_tokens)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    pos = kv_lens[seq] - q_lens[seq] + index_in_seq  # [T]

    # Every token gathers its sequence's KV in logical order: [T, max_kv, Hkv, D].
    k = k_pages[page_indices[seq]].reshape(num_tokens, max_kv, num_kv_heads, head_dim)
    v = v_pages[page_indices[seq]].reshape(num_tokens, max_kv, num_kv_heads, head_dim)
    k = jnp.repeat(k, group, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, group, axis=2).astype(jnp.float32)

    scores = jnp.einsum(
        "thd,tkhd->thk", q.astype(jnp.float32), k, precision=jax.lax.Precision.HIGHEST
    ) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    kv_pos = jnp.arange(max_kv, dtype=jnp.int32)
    visible = kv_pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        visible &= kv_pos[None, :] > pos[:, None] - sliding_window
    scores = jnp.where(visible[:, None, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("thk,tkhd->thd", probs, v, precision=jax.lax.Precision.HIGHEST)
    out = jnp.where(live[:, None, None], out, 0.0)
    return out.astype(q.dtype)


def ref_write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Write k_new/v_new [T, Hkv, D] to flat slots page * page_size + offset; returns new pages."""
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
    flat_shape = (num_pages * page_size, num_kv_heads, head_dim)
    k_flat = k_pages.reshape(flat_shape).at[slot_mapping].set(cast_to_cache(k_new, k_pages.dtype))
    v_flat = v_pages.reshape(flat_shape).at[slot_mapping].set(cast_to_cache(v_new, v_pages.dtype))
    return k_flat.reshape(k_pages.shape), v_flat.reshape(v_pages.shape)
