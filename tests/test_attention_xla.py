"""The XLA ragged paged attention (the CPU serving path) against a direct numpy computation."""
import numpy as np
import pytest
import jax.numpy as jnp

from jaxserve.pallas_kernels.attention import ragged_paged_attention, write_kv


def numpy_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale,
                    sliding_window=None, soft_cap=None):
    out = np.zeros_like(q)
    group = q.shape[1] // k_pages.shape[2]
    page_size = k_pages.shape[1]
    for s in range(num_seqs):
        q_len = cu_q_lens[s + 1] - cu_q_lens[s]
        kv_len = kv_lens[s]
        pages = page_indices[s, : -(-kv_len // page_size)]
        k = k_pages[pages].reshape(-1, *k_pages.shape[2:])[:kv_len]
        v = v_pages[pages].reshape(-1, *v_pages.shape[2:])[:kv_len]
        for i in range(q_len):
            pos = kv_len - q_len + i
            t = cu_q_lens[s] + i
            for h in range(q.shape[1]):
                scores = k[:, h // group] @ q[t, h] * sm_scale
                if soft_cap:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                kv_pos = np.arange(kv_len)
                mask = kv_pos <= pos
                if sliding_window:
                    mask &= kv_pos > pos - sliding_window
                scores = np.where(mask, scores, -np.inf)
                p = np.exp(scores - scores.max())
                out[t, h] = (p / p.sum()) @ v[:, h // group]
    return out


def make_case(rng, q_lens, kv_lens, page_size, heads, kv_heads, head_dim, token_bucket, slot_bucket,
              pages_per_seq, share_prefix=False):
    num_pages = 1 + sum(-(-n // page_size) for n in kv_lens) + 2
    k_pages = rng.standard_normal((num_pages, page_size, kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, kv_heads, head_dim)).astype(np.float32)
    page_indices = np.zeros((slot_bucket, pages_per_seq), np.int32)
    free = list(range(1, num_pages))
    rng.shuffle(free)
    for s, n in enumerate(kv_lens):
        for p in range(-(-n // page_size)):
            page_indices[s, p] = free.pop()
    if share_prefix and len(kv_lens) > 1:
        page_indices[1, 0] = page_indices[0, 0]
    cu = np.zeros(slot_bucket + 1, np.int32)
    cu[1 : len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1 :] = cu[len(q_lens)]
    kv = np.zeros(slot_bucket, np.int32)
    kv[: len(kv_lens)] = kv_lens
    q = rng.standard_normal((token_bucket, heads, head_dim)).astype(np.float32)
    return q, k_pages, v_pages, kv, page_indices, cu, np.array([len(q_lens)], np.int32)


CASES = [
    # q_lens, kv_lens, page_size, heads, kv_heads, token_bucket, slot_bucket, pages_per_seq
    ([1, 1, 1], [5, 16, 33], 4, 4, 2, 4, 4, 12),  # decode only
    ([7, 1, 16], [7, 9, 20], 4, 4, 1, 32, 4, 8),  # prefill + decode + chunked prefill
    ([3], [3], 8, 2, 2, 8, 2, 2),  # padded slots and tokens
    ([1, 12], [300, 12], 16, 6, 2, 16, 2, 24),  # KV longer than one chunk
    ([8, 8], [16, 24], 8, 4, 2, 16, 2, 4),  # exact page boundaries
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window,cap", [(None, None), (5, None), (None, 3.0)])
def test_xla_attention_matches_numpy(case, window, cap):
    q_lens, kv_lens, ps, h, hkv, tb, sb, pps = case
    rng = np.random.default_rng(len(q_lens) * 7 + ps)
    args = make_case(rng, q_lens, kv_lens, ps, h, hkv, 16, tb, sb, pps, share_prefix=True)
    got = ragged_paged_attention(*map(jnp.asarray, args), sm_scale=0.25, sliding_window=window, soft_cap=cap)
    want = numpy_attention(*args[:6], len(q_lens), 0.25, window, cap)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    assert not np.asarray(got)[sum(q_lens):].any(), "padded tokens must return zeros"


def test_write_kv_places_tokens_in_slots():
    k_pages = jnp.zeros((3, 4, 1, 2))
    new = jnp.arange(6, dtype=jnp.float32).reshape(3, 1, 2)
    k, v = write_kv(k_pages, k_pages, new, -new, jnp.array([5, 6, 0]))
    assert np.asarray(k)[1, 1, 0].tolist() == [0, 1] and np.asarray(k)[1, 2, 0].tolist() == [2, 3]
    assert np.asarray(v)[1, 1, 0].tolist() == [0, -1]
