"""Pallas ragged paged-attention kernels (TPU and GPU flavours, interpret mode on the CPU) and the
KV-write kernel, checked against the pure-JAX reference; the reference is checked against JAX's
own `ref_ragged_paged_attention` (a second, outside oracle)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as jax_rpa

from jaxserve.pallas_kernels import cpu_kernels
from jaxserve.pallas_kernels.attention import write_kv, xla_ragged_paged_attention
from jaxserve.pallas_kernels.kv_write import write_kv_pallas
from jaxserve.pallas_kernels.ragged_attention_gpu import ragged_paged_attention_gpu
from jaxserve.pallas_kernels.ragged_attention_tpu import ragged_paged_attention_tpu
from jaxserve.pallas_kernels.reference import cast_to_cache, ref_ragged_paged_attention, ref_write_kv

ATOL = RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Static shapes of a batch (one compile per Shapes); contents are drawn per seed."""
    page_size: int
    num_kv_heads: int
    group: int  # query heads per KV head
    num_seq_slots: int  # S bucket
    num_tokens: int  # T bucket
    pages_per_seq: int
    head_dim: int = 8
    num_pages: int = 40

    @property
    def num_heads(self):
        return self.num_kv_heads * self.group


def random_batch(shapes: Shapes, seed: int, *, decode_only: bool = False):
    """A ragged batch exercising the edge cases the serving path produces.

    Live sequences < S (padded slots with kv_len 0), live tokens < T (padding tokens), one q_len of
    1, one kv_len on an exact page boundary, and sequence 1 sharing sequence 0's first pages.
    """
    rng = np.random.default_rng(seed)
    p, s = shapes.page_size, shapes.num_seq_slots
    max_kv = shapes.pages_per_seq * p
    budget = shapes.num_tokens - 2  # leave padding tokens at the end
    num_live = int(rng.integers(2, min(s - 1, budget) + 1))  # at least one padded slot
    if decode_only:
        q_lens = np.ones(num_live, np.int64)
    else:
        q_lens = rng.integers(1, budget // num_live + 1, size=num_live)
        q_lens[0] = 1
    kv_lens = np.array([rng.integers(q, max_kv + 1) for q in q_lens])
    kv_lens[-1] = max(q_lens[-1], p * int(rng.integers(1, shapes.pages_per_seq + 1)))  # boundary
    kv_lens[-1] = -(-kv_lens[-1] // p) * p
    assert q_lens.sum() <= shapes.num_tokens and kv_lens.max() <= max_kv

    page_indices = np.zeros((s, shapes.pages_per_seq), np.int32)  # padded slots -> scratch page 0
    for i in range(num_live):
        page_indices[i] = rng.choice(np.arange(1, shapes.num_pages), shapes.pages_per_seq,
                                     replace=False)
    shared = int(min(kv_lens[0], kv_lens[1]) // p)  # full pages both sequences cover
    page_indices[1, :shared] = page_indices[0, :shared]

    cu = np.zeros(s + 1, np.int32)
    cu[1:num_live + 1] = np.cumsum(q_lens)
    cu[num_live + 1:] = cu[num_live]
    kv = np.zeros(s, np.int32)
    kv[:num_live] = kv_lens
    kv_shape = (shapes.num_pages, p, shapes.num_kv_heads, shapes.head_dim)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return dict(
        q=normal(shapes.num_tokens, shapes.num_heads, shapes.head_dim),
        k_pages=normal(*kv_shape), v_pages=normal(*kv_shape),
        kv_lens=jnp.asarray(kv), page_indices=jnp.asarray(page_indices),
        cu_q_lens=jnp.asarray(cu), num_seqs=jnp.asarray([num_live], jnp.int32),
    )


KERNELS = {"gpu": ragged_paged_attention_gpu, "tpu": ragged_paged_attention_tpu}

# (shapes, options) pairs kept few: every new pair is a fresh interpret-mode compile.
FAST_CASES = [
    (Shapes(page_size=4, num_kv_heads=2, group=2, num_seq_slots=5, num_tokens=20,
            pages_per_seq=5), {}),
    (Shapes(page_size=8, num_kv_heads=1, group=3, num_seq_slots=4, num_tokens=16,
            pages_per_seq=3), {"sliding_window": 5, "soft_cap": 3.0}),
]
SLOW_CASES = [
    (Shapes(page_size=2, num_kv_heads=4, group=1, num_seq_slots=6, num_tokens=24,
            pages_per_seq=10, num_pages=64), {"sliding_window": 3}),
    (Shapes(page_size=16, num_kv_heads=2, group=4, num_seq_slots=3, num_tokens=40,
            pages_per_seq=3), {"soft_cap": 1.5}),
    (Shapes(page_size=4, num_kv_heads=2, group=2, num_seq_slots=8, num_tokens=8,
            pages_per_seq=4), {"sliding_window": 6, "soft_cap": 2.0}),
]


def assert_matches_reference(kernel, shapes, options, seeds, decode_only=False):
    for seed in seeds:
        batch = random_batch(shapes, seed, decode_only=decode_only)
        want = ref_ragged_paged_attention(**batch, sm_scale=0.35, **options)
        got = kernel(**batch, sm_scale=0.35, interpret=True, **options)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("shapes,options", FAST_CASES)
def test_kernel_matches_reference(backend, shapes, options):
    assert_matches_reference(KERNELS[backend], shapes, options, seeds=(0, 1))


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_kernel_decode_only_batch(backend):
    shapes = Shapes(page_size=4, num_kv_heads=2, group=2, num_seq_slots=5, num_tokens=5,
                    pages_per_seq=5)
    assert_matches_reference(KERNELS[backend], shapes, {}, seeds=(2,), decode_only=True)


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_kernel_reads_a_float8_cache(backend):
    """vLLM's fp8 KV cache: the kernels widen float8_e4m3fn pages (to the queries' dtype) and attend as the
    reference does over the same values."""
    shapes, options = FAST_CASES[1]
    batch = random_batch(shapes, 5)
    narrow = {**batch, **{name: cast_to_cache(batch[name] * 40, jnp.float8_e4m3fn)  # some past 448: saturated
                          for name in ("k_pages", "v_pages")}}
    wide = {**narrow, **{name: narrow[name].astype(jnp.float32) for name in ("k_pages", "v_pages")}}
    want = ref_ragged_paged_attention(**wide, sm_scale=0.35, **options)
    got = KERNELS[backend](**narrow, sm_scale=0.35, interpret=True, **options)
    assert np.isfinite(np.asarray(want)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL * 100, rtol=RTOL)


@pytest.mark.parametrize("query_block", [1, 8])
def test_xla_path_reads_a_float8_cache(query_block):
    shapes, options = FAST_CASES[0]
    batch = random_batch(shapes, 6, decode_only=query_block == 1)
    narrow = {**batch, **{name: cast_to_cache(batch[name], jnp.float8_e5m2) for name in ("k_pages", "v_pages")}}
    wide = {**narrow, **{name: narrow[name].astype(jnp.float32) for name in ("k_pages", "v_pages")}}
    want = ref_ragged_paged_attention(**wide, sm_scale=0.35, **options)
    got = xla_ragged_paged_attention(**narrow, sm_scale=0.35, query_block=query_block, **options)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_every_kv_write_path_saturates_into_a_float8_cache(dtype):
    """The reference, XLA's scatter, the CPU row writer and the Pallas kernel write the same bytes: values past
    the format's largest saturate to it (a plain cast gives e4m3fn NaN), padded tokens land in scratch page 0."""
    rng = np.random.default_rng(1)
    shape, t = (5, 4, 2, 8), 6
    pages = cast_to_cache(jnp.asarray(rng.standard_normal(shape), jnp.float32), dtype)
    new = jnp.asarray(rng.standard_normal((t, 2, 8)) * 3e4, jnp.float32)  # most past e4m3's 448
    new = new.at[4:].set(new[3])  # three padding rows, alike: which one lands in the scratch slot is unspecified
    slots = jnp.asarray([5, 9, 19, 0, 0, 0], jnp.int32)
    want, _ = ref_write_kv(pages, pages, new, new, slots)
    largest = float(jnp.finfo(dtype).max)
    assert not np.isnan(np.asarray(want, np.float32)).any() and np.abs(np.asarray(want, np.float32)).max() == largest
    writers = {"xla": lambda p: write_kv(p, p, new, new, slots, backend="xla")[0],
               "pallas": lambda p: write_kv_pallas(p, jnp.array(p), new, new, slots, interpret=True)[0]}
    if cpu_kernels.available():
        writers["cpu"] = lambda p: jax.jit(lambda p: write_kv(p, p, new, new, slots, backend="cpu")[0])(p)
        assert "jaxserve_write_rows" in jax.jit(lambda p: write_kv(p, p, new, new, slots, backend="cpu")).lower(
            pages).as_text()
    for name, writer in writers.items():
        got = writer(jnp.array(pages))
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("shapes,options", SLOW_CASES)
def test_kernel_matches_reference_sweep(backend, shapes, options):
    assert_matches_reference(KERNELS[backend], shapes, options, seeds=(3, 4, 5))


def test_reference_padding_rows_are_zero_and_live_rows_are_not():
    shapes, _ = FAST_CASES[0]
    batch = random_batch(shapes, seed=7)
    out = np.asarray(ref_ragged_paged_attention(**batch, sm_scale=0.35))
    live = int(batch["cu_q_lens"][int(batch["num_seqs"][0])])
    assert live < shapes.num_tokens
    assert np.all(out[live:] == 0.0)
    assert np.all(np.abs(out[:live]).sum(axis=(1, 2)) > 0)


def test_reference_single_visible_key_returns_its_value():
    """A sequence's first token (position 0) sees only KV position 0: output == v there."""
    shapes, _ = FAST_CASES[0]
    batch = random_batch(shapes, seed=8)
    batch["kv_lens"] = batch["kv_lens"].at[0].set(1)  # seq 0: q_len 1, kv_len 1
    out = ref_ragged_paged_attention(**batch, sm_scale=0.35)
    first_page = int(batch["page_indices"][0, 0])
    v0 = jnp.repeat(batch["v_pages"][first_page, 0], shapes.group, axis=0)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(v0), atol=1e-6)


def jax_reference(batch, **options):
    """JAX's ref: combined KV pages (K on even heads, V on odd), output only for live tokens."""
    k, v = batch["k_pages"], batch["v_pages"]
    kv = jnp.stack([k, v], axis=3).reshape(*k.shape[:2], 2 * k.shape[2], k.shape[3])
    return jax_rpa.ref_ragged_paged_attention(
        batch["q"], kv, batch["kv_lens"], batch["page_indices"], batch["cu_q_lens"],
        batch["num_seqs"], **options)


# JAX's ref runs eagerly with a Python loop over sequences (slow): one seed per case by default.
@pytest.mark.parametrize("shapes,options", FAST_CASES + [
    pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES])
def test_reference_matches_jax_reference(shapes, options):
    for seed in (10,):
        batch = random_batch(shapes, seed)
        live = int(batch["cu_q_lens"][int(batch["num_seqs"][0])])
        ours = ref_ragged_paged_attention(**batch, sm_scale=0.35, **options)
        theirs = jax_reference(batch, sm_scale=0.35, **options)
        assert theirs.shape[0] == live
        np.testing.assert_allclose(np.asarray(ours[:live]), np.asarray(theirs),
                                   atol=ATOL, rtol=RTOL)


def test_write_kv_pallas_matches_reference():
    rng = np.random.default_rng(0)
    num_pages, page_size, hkv, d, t = 6, 4, 3, 8, 7
    shape = (num_pages, page_size, hkv, d)
    k_pages = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k_new = jnp.asarray(rng.standard_normal((t, hkv, d)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((t, hkv, d)), jnp.float32)
    slots = jnp.asarray(rng.choice(np.arange(page_size, num_pages * page_size), t, replace=False),
                        jnp.int32)
    want_k, want_v = ref_write_kv(k_pages, v_pages, k_new, v_new, slots)
    got_k, got_v = write_kv_pallas(jnp.array(k_pages), jnp.array(v_pages), k_new, v_new, slots,
                                   interpret=True)
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(want_k))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    # The written rows really changed and the others really did not.
    flat = np.asarray(got_k).reshape(-1, hkv, d)
    np.testing.assert_array_equal(flat[np.asarray(slots)], np.asarray(k_new))
    untouched = np.setdiff1d(np.arange(num_pages * page_size), np.asarray(slots))
    np.testing.assert_array_equal(flat[untouched],
                                  np.asarray(k_pages).reshape(-1, hkv, d)[untouched])


def test_write_kv_pallas_padded_tokens_only_touch_scratch_page():
    shape = (3, 4, 2, 8)
    k_pages = jnp.ones(shape, jnp.float32)
    new = jnp.full((3, 2, 8), 5.0, jnp.float32)
    slots = jnp.asarray([5, 0, 0], jnp.int32)  # one real token, two padded -> page 0 slot 0
    got_k, _ = write_kv_pallas(k_pages, jnp.ones(shape, jnp.float32), new, new, slots,
                               interpret=True)
    got = np.asarray(got_k)
    assert np.all(got[1, 1] == 5.0) and np.all(got[0, 0] == 5.0)
    mask = np.ones(shape[:2], bool)
    mask[1, 1] = mask[0, 0] = False
    assert np.all(got[mask] == 1.0)
