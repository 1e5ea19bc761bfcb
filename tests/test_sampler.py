"""The on-device sampler against numpy references of vLLM's formulas (CPU, small vocabularies)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxserve.sampler import (SamplerFlags, greedy_tokens, apply_penalties, apply_top_k_top_p_min_p, filter_cutoffs,
                              _sample_categorical, sample, token_logprobs)
from jaxserve.sampling_metadata import (RowSamplingState, allowed_token_mask, build_sampling_tensors,
                                        pack_token_mask, placeholder_sampling_tensors, unpack_token_mask)
from jaxserve.sampling_params import SamplingParams, bad_words_token_ids, truncate_prompt

SAMPLE = jax.jit(sample, static_argnames="flags")


def run(logits: np.ndarray, rows: list[RowSamplingState], bucket: int | None = None, max_logprobs: int = 5):
    bucket = bucket or len(rows)
    padded = np.zeros((bucket, logits.shape[1]), np.float32)
    padded[: logits.shape[0]] = logits
    tensors, flags = build_sampling_tensors(rows, bucket, logits.shape[1], max_logprobs)
    return SAMPLE(jnp.asarray(padded), tensors, flags=flags), flags


def row(seed: int = 0, prompt=(1, 2, 3), output=(), **params) -> RowSamplingState:
    return RowSamplingState(SamplingParams(**params), list(prompt), list(output), seed)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * scale).astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


def reference_keep(z: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """vLLM by sorting: top_k, then top_p on the renormalized top-k mass, then min_p."""
    order = np.argsort(-z, kind="stable")
    keep = np.ones(z.shape[0], bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        p = softmax(np.where(keep, z, -np.inf))[order]
        keep[order[(np.cumsum(p) - p) >= top_p]] = False
    if min_p > 0.0:
        p = softmax(np.where(keep, z, -np.inf))
        keep &= p >= min_p * p.max()
    return keep


def draw_many(logits_row: np.ndarray, num: int, **params) -> np.ndarray:
    """`num` samples of one distribution: one row per seed in a single call."""
    rows = [row(seed=s, **params) for s in range(num)]
    out, _ = run(np.repeat(logits_row[None], num, axis=0), rows)
    return np.asarray(out.token_ids)


def assert_frequencies(tokens: np.ndarray, probs: np.ndarray) -> None:
    counts = np.bincount(tokens, minlength=probs.shape[0])
    assert counts[probs == 0].sum() == 0, "sampled a token of probability zero"
    support = probs > 0
    expected = probs[support] / probs[support].sum() * tokens.shape[0]
    assert stats.chisquare(counts[support], expected).pvalue > 1e-3


def test_greedy_is_argmax_without_rng_or_filtering():
    logits = random_logits(6, 300)
    out, flags = run(logits, [row(temperature=0.0, top_k=3, seed=s) for s in range(6)], bucket=8)
    assert flags.all_greedy and not flags.needs_filtering and flags.num_logprobs == 0
    assert out.top_ids is None and out.rank is None  # nobody asked: no top-k, no rank count
    assert not flags.needs_logprob and not np.asarray(out.logprob).any()  # nor the sampled token's logprob
    np.testing.assert_array_equal(np.asarray(out.token_ids)[:6], logits.argmax(-1))
    np.testing.assert_array_equal(np.asarray(out.token_ids)[6:], 0)  # padded rows: argmax of zeros
    # best_of > n ranks outputs by their cumulative logprob: the sampled token's logprob comes along
    out, flags = run(logits, [row(temperature=0.0, seed=s, n=1, best_of=2) for s in range(6)], bucket=8)
    assert flags.needs_logprob and flags.num_logprobs == 0 and out.top_ids is None
    reference = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))[np.arange(6), logits.argmax(-1)]
    np.testing.assert_allclose(np.asarray(out.logprob)[:6], reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.token_ids)[:6], logits.argmax(-1))


def test_greedy_tokens_are_the_first_maximum():
    logits = random_logits(5, 300)
    logits[1, [4, 200]] = logits[1].max() + 1.0  # a tie: the first index, as argmax
    logits[2] = -np.inf  # a row masked out entirely (argmax: 0)
    logits[3, 7] = np.nan  # no maximum to match: a valid index all the same
    got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got[[0, 1, 2, 4]], logits[[0, 1, 2, 4]].argmax(-1))
    assert got[1] == 4 and got[2] == 0 and 0 <= got[3] < 300


def test_greedy_rows_beside_random_rows_stay_argmax():
    logits = random_logits(8, 300, seed=1)
    logits[3, [17, 250]] = logits[3].max() + 1.0  # a tie: argmax takes the first
    rows = [row(seed=s, temperature=0.0 if s % 2 else 1.0, top_p=0.5) for s in range(8)]
    out, flags = run(logits, rows)
    assert not flags.all_greedy
    np.testing.assert_array_equal(np.asarray(out.token_ids)[1::2], logits[1::2].argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_softmax(temperature):
    logits = random_logits(1, 12, seed=2, scale=1.0)[0]
    tokens = draw_many(logits, 4000, temperature=temperature)
    assert_frequencies(tokens, softmax(logits / temperature))


@pytest.mark.parametrize("params", [dict(top_k=4), dict(top_p=0.7), dict(min_p=0.1),
                                    dict(top_k=10, top_p=0.8, min_p=0.1, temperature=0.8)])
def test_filtered_sampling_keeps_exactly_the_right_tokens_and_mass(params):
    logits = random_logits(1, 40, seed=3, scale=0.7)[0]
    temperature = params.get("temperature", 1.0)
    keep = reference_keep(logits / temperature, params.get("top_k", -1), params.get("top_p", 1.0),
                          params.get("min_p", 0.0))
    assert 1 < keep.sum() < 40
    tokens = draw_many(logits, 4000, **params)
    assert set(np.unique(tokens)) <= set(np.flatnonzero(keep))
    assert_frequencies(tokens, np.where(keep, softmax(logits / temperature), 0.0))


@pytest.mark.parametrize("window", [8, 64, 1024])
def test_filter_masks_equal_sorting_reference_in_and_beyond_the_window(window):
    """Small windows push wide nuclei and large top_k onto the exact bisection; 1024 holds them all."""
    vocab = 1000
    logits = random_logits(8, vocab, seed=4, scale=1.0)
    logits[7] = logits[7] * 0.01  # five tokens far ahead of a flat tail (see the test below)
    logits[7, [3, 100, 400, 555, 999]] += 6.0
    settings = [(5, 1.0, 0.0), (-1, 0.9, 0.0), (300, 1.0, 0.0), (50, 0.6, 0.05), (-1, 1.0, 0.5), (-1, 0.2, 0.0),
                (300, 0.3, 0.0), (300, 0.55, 0.0)]
    rows = [row(top_k=k, top_p=p, min_p=m) for k, p, m in settings]
    tensors, _ = build_sampling_tensors(rows, 8, vocab, 0)
    tensors, scaled = jax.tree.map(jnp.asarray, tensors), jnp.asarray(logits)
    masked = np.asarray(jax.jit(apply_top_k_top_p_min_p, static_argnums=2)(scaled, tensors, window))
    for i, (k, p, m) in enumerate(settings):
        np.testing.assert_array_equal(np.isfinite(masked[i]), reference_keep(logits[i], k, p, m), err_msg=str(i))
    cut = filter_cutoffs(scaled, tensors, window)
    in_window = np.asarray(cut.k_in_window & cut.p_in_window)
    assert in_window.all() == (window == 1024)
    assert in_window[[0, 4]].all()  # top_k=5 and min_p alone always fit


def test_top_p_under_a_top_k_wider_than_the_window_uses_the_whole_top_k_mass():
    """Alone in its step (no other row forces the exact path): the nucleus fits the window, but its
    mass is relative to all 300 top-k tokens, which the window does not hold."""
    logits = random_logits(1, 1000, seed=4, scale=0.01)
    logits[0, [3, 100, 400, 555, 999]] += 6.0
    tensors, _ = build_sampling_tensors([row(top_k=300, top_p=0.55)], 1, 1000, 0)
    tensors = jax.tree.map(jnp.asarray, tensors)
    masked = np.asarray(apply_top_k_top_p_min_p(jnp.asarray(logits), tensors, 64))
    expected = reference_keep(logits[0], 300, 0.55, 0.0)
    assert expected.sum() == 4
    np.testing.assert_array_equal(np.isfinite(masked[0]), expected)
    assert not bool(filter_cutoffs(jnp.asarray(logits), tensors, 64).p_in_window[0])


def test_exact_path_with_only_top_p_beyond_the_window():
    logits = random_logits(3, 500, seed=11, scale=0.5)
    rows = [row(top_p=0.95), row(top_k=4, top_p=0.5), row(top_p=0.3, min_p=0.2)]
    tensors, _ = build_sampling_tensors(rows, 3, 500, 0)
    masked = np.asarray(apply_top_k_top_p_min_p(jnp.asarray(logits), jax.tree.map(jnp.asarray, tensors), 16))
    for i, (k, p, m) in enumerate([(-1, 0.95, 0.0), (4, 0.5, 0.0), (-1, 0.3, 0.2)]):
        np.testing.assert_array_equal(np.isfinite(masked[i]), reference_keep(logits[i], k, p, m))


@pytest.mark.parametrize("prompt_len", [4, 40000])  # windows of 64 (one packed scatter) and 65536 (two)
def test_penalties_follow_vllm_formulas(prompt_len):
    vocab = 12
    logits = random_logits(2, vocab, seed=5)
    prompt, output = [1, 2, 2] + [7] * (prompt_len - 3), [2, 3, 3, 3, 9]
    rows = [row(prompt=prompt, output=output, repetition_penalty=1.5, frequency_penalty=0.5,
                presence_penalty=0.3, temperature=0.0),
            row(prompt=prompt, output=output, temperature=0.0)]  # no penalties: untouched
    tensors, flags = build_sampling_tensors(rows, 2, vocab, 0)
    assert flags.needs_penalties and flags.penalty_window >= len(prompt) + len(output)
    got = np.asarray(apply_penalties(jnp.asarray(logits), jax.tree.map(jnp.asarray, tensors)))

    expected = logits[0].astype(np.float64)
    for token in set(prompt) | set(output):
        expected[token] = expected[token] / 1.5 if expected[token] > 0 else expected[token] * 1.5
    counts = np.bincount(output, minlength=vocab)
    expected -= 0.5 * counts + 0.3 * (counts > 0)
    np.testing.assert_allclose(got[0], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], logits[1])
    out, _ = run(logits, rows)
    assert int(out.token_ids[0]) == int(expected.argmax())


def test_logit_bias_is_added_to_the_named_tokens():
    logits = random_logits(2, 50, seed=6)
    out, flags = run(logits, [row(temperature=0.0, logit_bias={7: 100.0}),
                              row(temperature=0.0, logit_bias={int(logits[1].argmax()): -100.0})])
    assert flags.needs_logit_bias
    assert int(out.token_ids[0]) == 7
    assert int(out.token_ids[1]) == int(np.argsort(-logits[1])[1])


def test_bitmask_pack_roundtrip():
    allowed = np.random.default_rng(7).random(77) < 0.3
    packed = pack_token_mask(allowed)
    assert packed.dtype == np.int32 and packed.shape == (3,)
    np.testing.assert_array_equal(unpack_token_mask(packed, 77), allowed)
    assert packed[0] & 1 == allowed[0] and (packed[1] >> 2) & 1 == allowed[34]


def test_guided_bitmask_and_allowed_token_ids_are_respected():
    vocab = 100
    guided_allowed = np.zeros(vocab, bool)
    guided_allowed[[3, 40, 63, 64, 99]] = True
    logits = np.tile(random_logits(1, vocab, seed=8, scale=0.3), (600, 1))
    rows = [RowSamplingState(SamplingParams(), [1], [], s, bitmask=pack_token_mask(guided_allowed))
            for s in range(300)]
    rows += [row(seed=s, allowed_token_ids=[5, 63, 64]) for s in range(300)]
    for r in rows[450:]:  # the engine's per-request precomputed mask gives the same result
        r.allowed_mask = allowed_token_mask(r.params, vocab)
    out, flags = run(logits, rows)
    tokens = np.asarray(out.token_ids)
    assert flags.needs_bitmask
    assert set(np.unique(tokens[:300])) == {3, 40, 63, 64, 99}  # all allowed ones appear, nothing else
    assert set(np.unique(tokens[300:])) == {5, 63, 64}


def test_min_tokens_forbids_eos_and_stop_tokens_until_reached():
    vocab = 30
    logits = np.zeros((4, vocab), np.float32)
    logits[:, 0] = 50.0  # EOS dominates
    logits[:, 1] = 40.0  # a stop token next
    make = lambda output, **kw: RowSamplingState(
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[1], **kw), [5], output, 0, eos_token_ids=(0,))
    rows = [make([7]), make([7, 8, 9]), make([7], ignore_eos=True), make([7, 8])]
    out, _ = run(logits, rows)
    assert np.asarray(out.token_ids).tolist() == [2, 0, 0, 2]


def test_bad_words_ban_a_last_token_only_after_its_prefix():
    vocab = 30
    logits = np.zeros((5, vocab), np.float32)
    logits[:, 4], logits[:, 6], logits[:, 9] = 50.0, 40.0, 30.0  # greedy prefers 4, then 6, then 9
    make = lambda output, words: RowSamplingState(
        SamplingParams(temperature=0.0, bad_words=["x"], bad_words_token_ids=words), [5], output, 0)
    rows = [make([], [[4]]),  # a one-token word: banned from the start
            make([1, 2], [[2, 4]]),  # the output ends with the word's prefix: its end is banned
            make([2, 1], [[2, 4]]),  # it does not: nothing banned
            make([7, 8], [[7, 8, 4], [8, 6]]),  # two words' prefixes end the output: both ends banned
            make([8], [[7, 8, 4]])]  # shorter than the prefix: nothing banned
    out, flags = run(logits, rows)
    assert flags.needs_bitmask
    assert np.asarray(out.token_ids).tolist() == [6, 6, 4, 9, 4]


def test_bad_words_token_ids_take_the_spaced_spelling_when_it_is_the_same_word():
    vocab = {"Paris": [10], " Paris": [11], "New York": [20, 21], " New York": [22, 21], "ab": [30, 31],
             " ab": [32]}
    assert bad_words_token_ids(["Paris", " New York", "ab"], vocab.__getitem__) == [[10], [11], [20, 21],
                                                                                   [22, 21], [30, 31]]


def test_truncate_prompt_keeps_the_last_tokens():
    ids = list(range(10))
    assert truncate_prompt(ids, None, 8) is ids
    assert truncate_prompt(ids, 3, 8) == [7, 8, 9]
    assert truncate_prompt(ids, -1, 8) == ids[2:]
    assert truncate_prompt(ids[:2], 3, 8) == [0, 1]
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        truncate_prompt(ids, 9, 8)
    for keep in (0, -2):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=keep).validate()
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[" "]).validate()


def test_same_seed_same_tokens_alone_and_in_a_busy_bucket_at_full_vocab():
    vocab = 49152
    logits = random_logits(64, vocab, seed=9, scale=3.0)
    mine = dict(temperature=0.9, top_p=0.95)
    alone = []
    for step in range(3):
        out, _ = run(logits[:1], [row(seed=1234, output=[11] * step, **mine)], bucket=1)
        alone.append(int(out.token_ids[0]))
    for step in range(3):
        neighbours = [row(seed=s, output=[5] * s, temperature=1.3, top_k=20, repetition_penalty=1.2,
                          logit_bias={3: 2.0}, allowed_token_ids=list(range(0, vocab, 2)), logprobs=2)
                      for s in range(63)]
        rows = neighbours[:17] + [row(seed=1234, output=[11] * step, **mine)] + neighbours[17:]
        busy = np.concatenate([logits[1:18], logits[:1], logits[18:]])
        out, flags = run(busy, rows, bucket=64)
        assert flags.needs_penalties and flags.needs_bitmask and flags.num_logprobs == 5
        assert int(out.token_ids[17]) == alone[step]
    assert len(set(alone)) > 1  # the step moves the key


def test_logprobs_ranks_and_top_alternatives_come_from_the_raw_logits():
    logits = random_logits(4, 200, seed=10)
    rows = [row(seed=s, temperature=1.5, top_k=30, presence_penalty=1.0, output=[1, 2], logprobs=3)
            for s in range(4)]
    out, flags = run(logits, rows, max_logprobs=6)
    reference = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    tokens = np.asarray(out.token_ids)
    np.testing.assert_allclose(np.asarray(out.logprob), reference[np.arange(4), tokens], rtol=1e-5, atol=1e-5)
    order = np.argsort(-reference, axis=-1)[:, :6]
    np.testing.assert_array_equal(np.asarray(out.top_ids), order)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.take_along_axis(reference, order, -1), atol=1e-5)
    ranks = 1 + (reference > reference[np.arange(4), tokens][:, None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(out.rank), ranks)


def test_token_logprobs_for_prompt_positions():
    logits = random_logits(5, 64, seed=12)
    targets = np.array([3, 0, 63, 17, 17])
    out = jax.jit(token_logprobs, static_argnums=2)(jnp.asarray(logits), jnp.asarray(targets), 1)
    reference = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    np.testing.assert_allclose(np.asarray(out.logprob), reference[np.arange(5), targets], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.rank), 1 + (logits > logits[np.arange(5), targets][:, None]).sum(-1))
    np.testing.assert_array_equal(np.asarray(out.top_ids)[:, 0], logits.argmax(-1))


def test_categorical_never_returns_a_zero_probability_token_at_the_edges():
    vocab = 300
    scaled = np.full((5, vocab), -np.inf, np.float32)
    scaled[:, [130, 131, 257]] = [0.0, 1.0, -1.0]  # positive mass only in two blocks, gaps around
    uniforms = jnp.asarray([0.0, 1e-9, 0.5, 1.0 - 2.0 ** -24, 1.0], jnp.float32)
    tokens = np.asarray(_sample_categorical(jnp.asarray(scaled), uniforms))
    assert set(tokens.tolist()) <= {130, 131, 257}
    assert tokens[0] == 130 and tokens[-1] == 257


def test_padding_and_identity_rows_keep_flags_cheap():
    tensors, flags = build_sampling_tensors([row(temperature=0.0)], 4, 64, 20)
    assert flags == SamplerFlags(all_greedy=True)
    assert tensors.bitmask.shape == (4, 0) and tensors.penalty_token_ids.shape == (4, 0)
    assert tensors.live_rows.tolist() == [1]  # the LM head computes this one row of the bucket's four
    with pytest.raises(ValueError):
        build_sampling_tensors([row()] * 3, 2, 64, 20)


def test_placeholder_tensors_match_real_ones_so_warm_up_compiles_the_same_variant():
    rows = [row(temperature=0.7, top_k=100, top_p=0.9, repetition_penalty=1.1, logit_bias={1: 2.0},
                allowed_token_ids=[1, 2, 3], logprobs=2, output=[4] * 70)]
    tensors, flags = build_sampling_tensors(rows, 8, 1000, 5)
    assert (flags.filter_window, flags.penalty_window, flags.logit_bias_width) == (128, 128, 8)
    placeholder = placeholder_sampling_tensors(flags, 8, 1000)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(placeholder) == shapes(tensors)
