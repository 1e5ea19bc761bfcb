"""The sampler's cut-offs through the CPU kernel (pallas_kernels/cpu_sampling.cc) against the sorting reference
and the sampler's own JAX path: the same surviving tokens, the same seeded draws."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.pallas_kernels import cpu_kernels
from jaxserve.sampler import filter_threshold, sample, token_logprobs
from jaxserve.sampling_metadata import build_sampling_tensors
from test_sampler import assert_frequencies, random_logits, reference_keep, row, softmax

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler or no AVX2 here")

THRESHOLD = jax.jit(cpu_kernels.sampling_threshold)
SAMPLE = jax.jit(sample, static_argnames=("flags", "cpu_kernel"))


def kernel_keep(logits: np.ndarray, settings, live: int | None = None):
    """(kept mask per row, thresholds, row maxima) through the kernel; settings: (top_k, top_p, min_p) per row."""
    k, p, m = (np.array(column, dtype) for column, dtype in zip(zip(*settings), (np.int32, np.float32, np.float32)))
    live = len(settings) if live is None else live
    threshold, row_max = map(np.asarray, THRESHOLD(jnp.asarray(logits), k, p, m, np.array([live], np.int32)))
    return logits >= threshold[:, None], threshold, row_max


SETTINGS = [(5, 1.0, 0.0), (-1, 0.9, 0.0), (300, 1.0, 0.0), (50, 0.6, 0.05), (-1, 1.0, 0.5), (-1, 0.2, 0.0),
            (300, 0.3, 0.0), (300, 0.55, 0.0), (1, 0.9, 0.0), (0, 1.0, 0.0), (-1, 0.999, 0.0), (999, 0.95, 0.0)]


@pytest.mark.parametrize("scale", [0.01, 1.0, 4.0, 40.0])  # flat (every token past the pruning), ..., peaked
@pytest.mark.parametrize("vocab", [1000, 1003])  # and a tail past the vector width
def test_kernel_keeps_what_sorting_keeps(scale, vocab):
    logits = random_logits(len(SETTINGS), vocab, seed=int(scale * 10) + vocab, scale=scale)
    logits[-1, [3, 100, 400]] += 6.0  # a few tokens far ahead of the rest
    keep, _, row_max = kernel_keep(logits, SETTINGS)
    for i, (k, p, m) in enumerate(SETTINGS):
        np.testing.assert_array_equal(keep[i], reference_keep(logits[i], k, p, m), err_msg=str(SETTINGS[i]))
    np.testing.assert_array_equal(row_max, logits.max(axis=1))


def test_masked_tokens_and_a_top_k_beyond_the_finite_ones():
    """-inf tokens (guided decoding's mask) carry no mass; with fewer finite tokens than top_k every finite one
    stays, and top_p then takes its share of all of them."""
    vocab = 777
    logits = random_logits(4, vocab, seed=5, scale=1.5)
    logits[:, 10:] = -np.inf
    settings = [(50, 1.0, 0.0), (50, 0.5, 0.0), (-1, 0.7, 0.0), (3, 0.99, 0.0)]
    keep, threshold, _ = kernel_keep(logits, settings)
    assert threshold[0] == -np.inf and keep[0, :10].all()
    finite = np.isfinite(logits)
    for i, (k, p, m) in enumerate(settings):
        np.testing.assert_array_equal(keep[i] & finite[i], reference_keep(logits[i], k, p, m) & finite[i])


def test_padding_rows_are_left_alone():
    logits = random_logits(4, 200, seed=6)
    logits[2:] = np.nan  # whatever the LM head left in bucket padding
    _, threshold, row_max = kernel_keep(logits, [(5, 0.9, 0.1)] * 4, live=2)
    assert np.isfinite(threshold[:2]).all() and np.isfinite(row_max[:2]).all()
    np.testing.assert_array_equal(threshold[2:], [-np.inf, -np.inf])
    np.testing.assert_array_equal(row_max[2:], [0.0, 0.0])


def test_thresholds_equal_the_samplers_own_bisection():
    """At the full vocabulary, against filter_threshold with a window too small for most rows (its exact
    path): the thresholds are tokens' values, so equal bit for bit, but for top_p 0.999, whose cut-off lies
    among tokens of ~1e-8 probability: float32 rounding moves it by a few tokens (the bisection's sums by
    dozens; the kernel's double sums of float32 terms by at most a few)."""
    vocab = 49152
    logits = random_logits(len(SETTINGS), vocab, seed=7, scale=3.0)
    rows = [row(top_k=k, top_p=p, min_p=m, temperature=1.0) for k, p, m in SETTINGS]
    tensors, _ = build_sampling_tensors(rows, len(rows), vocab, 0)
    tensors = jax.tree.map(jnp.asarray, tensors)
    want, want_max = jax.jit(filter_threshold, static_argnums=2)(jnp.asarray(logits), tensors, 8)
    keep, got, got_max = kernel_keep(logits, SETTINGS)
    deep = SETTINGS.index((-1, 0.999, 0.0))
    others = np.arange(len(SETTINGS)) != deep
    np.testing.assert_array_equal(got[others], np.asarray(want)[others])
    np.testing.assert_array_equal(got_max, np.asarray(want_max))
    for i, (k, p, m) in enumerate(SETTINGS):
        if i != deep:
            np.testing.assert_array_equal(keep[i], reference_keep(logits[i], k, p, m), err_msg=str(SETTINGS[i]))
    assert np.sum(keep[deep] != reference_keep(logits[deep], -1, 0.999, 0.0)) <= 3


def test_seeded_draws_match_the_jax_path_in_a_mixed_step():
    vocab = 49152
    logits = random_logits(16, vocab, seed=8, scale=2.5)
    settings = [dict(temperature=0.8, top_p=0.95), dict(temperature=1.0, top_k=40), dict(temperature=0.7, min_p=0.1),
                dict(temperature=0.0), dict(temperature=1.2, top_k=200, top_p=0.5), dict(temperature=1.0)]
    rows = [row(seed=100 + i, output=[7] * i, **settings[i % len(settings)]) for i in range(14)]  # 2 padding rows
    tensors, flags = build_sampling_tensors(rows, 16, vocab, 0)
    assert flags.needs_filtering and not flags.all_greedy
    by_kernel = SAMPLE(jnp.asarray(logits), tensors, flags=flags, cpu_kernel=True)
    by_jax = SAMPLE(jnp.asarray(logits), tensors, flags=flags, cpu_kernel=False)
    np.testing.assert_array_equal(np.asarray(by_kernel.token_ids)[:14], np.asarray(by_jax.token_ids)[:14])
    assert int(by_kernel.token_ids[3]) == int(np.argmax(logits[3]))  # the greedy row


def test_draws_follow_the_filtered_distribution():
    logits = random_logits(1, 40, seed=3, scale=0.7)[0]
    params = dict(top_k=10, top_p=0.8, min_p=0.1, temperature=0.8)
    keep = reference_keep(logits / 0.8, 10, 0.8, 0.1)
    assert 1 < keep.sum() < 40
    rows = [row(seed=s, **params) for s in range(4000)]
    tensors, flags = build_sampling_tensors(rows, 4000, 40, 0)
    tokens = np.asarray(SAMPLE(jnp.asarray(np.repeat(logits[None], 4000, axis=0)), tensors, flags=flags,
                               cpu_kernel=True).token_ids)
    assert set(np.unique(tokens)) <= set(np.flatnonzero(keep))
    assert_frequencies(tokens, np.where(keep, softmax(logits / 0.8), 0.0))


def test_a_nucleus_beyond_the_pruned_tokens():
    """One token far ahead of a crowd 13 nats below it that holds ~10% of the mass: top_p 0.95 and a top_k
    into the crowd need tokens past the kernel's pruning (its histogram path)."""
    vocab = 49152
    rng = np.random.default_rng(9)
    logits = np.tile((-13.0 + 0.3 * rng.standard_normal(vocab)).astype(np.float32), (3, 1))
    logits[:, 17] = 0.0
    settings = [(-1, 0.95, 0.0), (2000, 1.0, 0.0), (40000, 0.97, 0.0)]
    keep, threshold, _ = kernel_keep(logits, settings)
    for i, (k, p, m) in enumerate(settings):
        want = reference_keep(logits[i], k, p, m)
        assert 1 < want.sum() < vocab
        assert abs(int(keep[i].sum()) - int(want.sum())) <= 1, settings[i]  # ~1e-6-mass tokens at the cut
        assert (keep[i] == want).mean() > 0.9999
    assert threshold[0] < -12.5


LOGPROBS = jax.jit(cpu_kernels.token_logprobs, static_argnums=2)
REFERENCE_LOGPROBS = jax.jit(token_logprobs, static_argnums=2)


@pytest.mark.parametrize("scale", [0.01, 1.0, 4.0, 40.0])
def test_logprobs_equal_the_jax_path(scale):
    """Ranks and the top alternatives equal the XLA path's (ties included: lower token first); logprobs agree
    to float rounding of the log of the total mass."""
    vocab, k = 4099, 20
    logits = random_logits(6, vocab, seed=int(scale * 7), scale=scale)
    logits[1, 100:140] = logits[1].max()  # a tie across the top
    logits[2, 50:] = -np.inf  # 50 finite tokens, -inf ones past them
    logits[3, 5:] = -np.inf  # fewer finite tokens than K: -inf alternatives, lowest tokens first
    tokens = np.array([0, 120, 7, 4, 4000, int(np.argmax(logits[5]))], np.int32)
    got = LOGPROBS(jnp.asarray(logits), jnp.asarray(tokens), k)
    want = REFERENCE_LOGPROBS(jnp.asarray(logits), jnp.asarray(tokens), k)
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want.top_ids))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want.rank))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want.logprob), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[3]), np.asarray(want.top_logprobs), rtol=1e-6, atol=1e-5)
    assert int(got[1][5]) == 1


def test_logprobs_at_full_vocab_through_the_sampler_and_padding_rows():
    vocab = 49152
    logits = random_logits(8, vocab, seed=12, scale=2.0)
    rows = [row(seed=i, temperature=0.0 if i % 2 else 0.9, top_p=0.9, logprobs=5) for i in range(6)]
    tensors, flags = build_sampling_tensors(rows, 8, vocab, 5)
    by_kernel = SAMPLE(jnp.asarray(logits), tensors, flags=flags, cpu_kernel=True)
    by_jax = SAMPLE(jnp.asarray(logits), tensors, flags=flags, cpu_kernel=False)
    for name in ("token_ids", "rank", "top_ids"):
        np.testing.assert_array_equal(np.asarray(getattr(by_kernel, name))[:6], np.asarray(getattr(by_jax, name))[:6])
    np.testing.assert_allclose(np.asarray(by_kernel.top_logprobs)[:6], np.asarray(by_jax.top_logprobs)[:6], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(by_kernel.top_ids)[6:], 0)  # bucket padding left alone


def test_masked_rows_through_the_sampler():
    """allowed_token_ids (the bitmask's -inf) with a top_k beyond the allowed tokens, a temperature just above
    greedy, and min_p 1: the same draws as the JAX path, all from the allowed tokens."""
    vocab = 49152
    logits = random_logits(4, vocab, seed=13, scale=2.0)
    allowed = [3, 77, 1000, 4096, 30000, 49151]
    rows = [row(seed=5, temperature=1.0, top_k=50, top_p=0.9, allowed_token_ids=allowed),
            row(seed=6, temperature=2e-5, top_p=0.5),
            row(seed=7, temperature=0.7, min_p=1.0),
            row(seed=8, temperature=1.5, top_k=1)]
    tensors, flags = build_sampling_tensors(rows, 4, vocab, 0)
    by_kernel = np.asarray(SAMPLE(jnp.asarray(logits), tensors, flags=flags, cpu_kernel=True).token_ids)
    by_jax = np.asarray(SAMPLE(jnp.asarray(logits), tensors, flags=flags, cpu_kernel=False).token_ids)
    np.testing.assert_array_equal(by_kernel, by_jax)
    assert by_kernel[0] in allowed
    np.testing.assert_array_equal(by_kernel[1:], np.argmax(logits[1:], axis=1))  # each keeps only its maximum


def test_greedy_tokens_and_logprobs_through_the_normalizer():
    """First maximum (ties to the lower token), log-normalizer as logsumexp, padding rows zero, and a NaN row
    as greedy_tokens leaves it (its last token)."""
    vocab = 49152
    logits = random_logits(6, vocab, seed=14, scale=3.0)
    logits[1, [10, 20, 30]] = 50.0
    logits[2, 100:] = -np.inf
    logits[3, 7] = np.nan
    log_total, first = map(np.asarray, jax.jit(cpu_kernels.log_normalizer)(jnp.asarray(logits), np.array([5], np.int32)))
    np.testing.assert_array_equal(first[[0, 1, 2, 4]], np.argmax(logits[[0, 1, 2, 4]], axis=1))
    assert first[1] == 10 and first[3] == vocab - 1 and np.isnan(log_total[3])
    np.testing.assert_allclose(log_total[[0, 1, 2, 4]], np.asarray(jax.nn.logsumexp(logits[[0, 1, 2, 4]], axis=1)),
                               rtol=1e-6)
    assert first[5] == 0 and log_total[5] == 0.0
    # the greedy tokens alone (steps that need no logprob): the same indices, NaN rows and padding included
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.first_max)(jnp.asarray(logits),
                                                                           np.array([5], np.int32))), first)
    rows = [row(temperature=0.0, logprobs=None, best_of=2) for _ in range(4)]  # the token's logprob needed
    tensors, flags = build_sampling_tensors(rows, 4, vocab, 0)
    clean = np.delete(logits, 3, axis=0)[:4]
    by_kernel = SAMPLE(jnp.asarray(clean), tensors, flags=flags, cpu_kernel=True)
    by_jax = SAMPLE(jnp.asarray(clean), tensors, flags=flags, cpu_kernel=False)
    np.testing.assert_array_equal(np.asarray(by_kernel.token_ids), np.asarray(by_jax.token_ids))
    np.testing.assert_allclose(np.asarray(by_kernel.logprob), np.asarray(by_jax.logprob), atol=1e-5)



def test_one_compiled_sampler_for_every_top_k_window(random_llama_dir, tmp_path):
    """With the kernel the cut-off needs no lax.top_k window: steps whose top_k would pick different windows
    share one compiled sampler (the JAX path compiles one per window)."""
    from jaxserve import LLM, SamplingParams
    llm = LLM(model=str(random_llama_dir), checkpoint_cache_dir=str(tmp_path), dtype="float32", max_model_len=128,
              max_num_seqs=2, max_num_batched_tokens=32, precompile=False)
    runner = llm.engine.runner
    assert runner.config.cpu_sampling
    run = lambda k: llm.generate([[5, 6, 7]], SamplingParams(temperature=0.9, top_k=k, max_tokens=2, seed=1))
    assert len(run(10)[0].outputs[0].token_ids) == 2
    compiled = runner._sample_fn._cache_size()  # the prompt's step and the decode step
    for k in (100, 300, 1000):  # windows 128, 512 and 1024 on the JAX path
        assert len(run(k)[0].outputs[0].token_ids) == 2
    assert runner._sample_fn._cache_size() == compiled
