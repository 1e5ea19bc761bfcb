"""The hand-written CPU kernels (pallas_kernels/cpu_kernels): projections against XLA's dot, attention against
the reference, and both inside the engine."""
import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.pallas_kernels import cpu_kernels
from jaxserve.pallas_kernels.attention import ragged_paged_attention
from jaxserve.pallas_kernels.reference import cast_to_cache, ref_ragged_paged_attention
from test_pallas_kernels import FAST_CASES, SLOW_CASES, Shapes, random_batch

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler or no AVX2 here")


def bf16(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.bfloat16)


@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (2, 1536, 576), (3, 100, 40), (5, 64, 16), (8, 130, 257),
                                   (2, 7, 3)])
def test_kernel_equals_xla_dot(w_transposed, m, k, n):
    """Shapes cover the threaded split (K >= 128), tails past the vector width in K and N, and several rows."""
    rng = np.random.default_rng(m * 1000 + k + n)
    x = bf16(rng, m, k)
    w = bf16(rng, n, k) if w_transposed else bf16(rng, k, n)
    got = jax.jit(cpu_kernels.kernel_matmul, static_argnums=2)(x, w, w_transposed)
    want = cpu_kernels.matmul(x, w, w_transposed)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    # Products of bf16 values are exact in float32: only the summation order differs.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_project_takes_the_kernel_only_where_it_pays():
    rng = np.random.default_rng(0)
    w = bf16(rng, 256, 64)
    hlo = lambda rows, **kw: jax.jit(lambda x: cpu_kernels.project(x, w, **kw)).lower(bf16(rng, rows, 256)).as_text()
    assert "jaxserve_bf16_matmul_kn" in hlo(2, kernel=True)
    assert "jaxserve_bf16_matmul_kn" not in hlo(2)  # the caller did not allow it (scanned or sharded weights)
    assert "jaxserve_bf16_matmul_kn" not in hlo(cpu_kernels.MAX_KERNEL_ROWS[False] + 1, kernel=True)
    w32 = w.astype(jnp.float32)
    assert "jaxserve" not in jax.jit(lambda x: cpu_kernels.project(x, w32, kernel=True)).lower(
        bf16(rng, 2, 256)).as_text()


def test_a_missing_compiler_fails_the_build_not_the_process(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(OSError):
        cpu_kernels._build(str(tmp_path / "no-such-c++"))
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left to load later


def test_engine_tokens_match_with_the_kernel_off(random_llama_dir):
    """bf16 weights on one CPU device turn the kernel on; greedy tokens and logprobs match XLA's dots."""
    llm = LLM(model=str(random_llama_dir), dtype="bfloat16", checkpoint_cache_dir=None, precompile=False,
              max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, block_size=4)
    runner = llm.engine.runner
    assert runner.config.cpu_kernel and runner.kernel_split is not runner.split
    rng = np.random.default_rng(3)
    prompts = [rng.integers(100, 40000, size=int(rng.integers(3, 30))).tolist() for _ in range(2)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    with_kernel = llm.generate(prompts, params)
    config, kernel_split = runner.config, runner.kernel_split

    def use(config, split):  # the step and sampler functions close over the runner: rebuild them
        runner.config, runner.kernel_split = config, split
        runner._step_fns.clear()
        runner._compiled_samplers.clear()
        runner._sample_fn = jax.jit(runner._sample, static_argnames=("flags",))

    try:
        use(dataclasses.replace(config, cpu_kernel=False), runner.split)
        without = llm.generate(prompts, params)
    finally:
        use(config, kernel_split)
    for a, b in zip(with_kernel, without):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        np.testing.assert_allclose(a.outputs[0].cumulative_logprob, b.outputs[0].cumulative_logprob, atol=1e-3)


ATTENTION_CASES = [(shapes, options) for shapes, options in FAST_CASES + SLOW_CASES] + [
    (Shapes(page_size=16, num_kv_heads=3, group=3, num_seq_slots=6, num_tokens=24, pages_per_seq=12,
            head_dim=64, num_pages=80), {}),  # SmolLM2's heads, contexts up to 192 tokens
    (Shapes(page_size=8, num_kv_heads=2, group=4, num_seq_slots=4, num_tokens=12, pages_per_seq=6,
            head_dim=40), {"sliding_window": 11}),  # a head_dim past the 16-wide loop
    # Fewer (sequence, KV head) items than twice the threads and long contexts: decode tokens' positions are
    # split into parts and merged (with a window, and with the window shorter than the parts need).
    (Shapes(page_size=16, num_kv_heads=1, group=3, num_seq_slots=3, num_tokens=6, pages_per_seq=24,
            head_dim=64, num_pages=80), {}),
    (Shapes(page_size=16, num_kv_heads=1, group=3, num_seq_slots=3, num_tokens=6, pages_per_seq=24,
            head_dim=64, num_pages=80), {"sliding_window": 200, "soft_cap": 30.0}),
    # Prefill chunks of up to 29 tokens: several blocks of queries, dealt over the parts of few sequences (and
    # a window shorter than a block, so tokens of one block see different ranges).
    (Shapes(page_size=16, num_kv_heads=1, group=2, num_seq_slots=3, num_tokens=60, pages_per_seq=6,
            head_dim=32, num_pages=40), {}),
    (Shapes(page_size=16, num_kv_heads=1, group=2, num_seq_slots=3, num_tokens=60, pages_per_seq=6,
            head_dim=32, num_pages=40), {"sliding_window": 5, "soft_cap": 20.0}),
    # Up to 8 live sequences of three KV heads: from 4, one unit per sequence (no parts).
    (Shapes(page_size=8, num_kv_heads=3, group=2, num_seq_slots=9, num_tokens=64, pages_per_seq=8,
            head_dim=16, num_pages=80), {}),
    # Llama 3's head_dim, and one whose rows widen to an odd number of vectors (the AVX-512 kernel's other
    # register budgets), pages of 8 (a block of 16 positions spans two).
    (Shapes(page_size=16, num_kv_heads=2, group=4, num_seq_slots=4, num_tokens=40, pages_per_seq=8,
            head_dim=128, num_pages=40), {}),
    (Shapes(page_size=8, num_kv_heads=2, group=5, num_seq_slots=3, num_tokens=30, pages_per_seq=12,
            head_dim=96, num_pages=40), {"sliding_window": 37}),
]


@pytest.mark.parametrize("shapes,options", ATTENTION_CASES)
def test_attention_kernel_matches_the_reference(shapes, options):
    """Ragged query lengths, padded slots and tokens, shared and page-boundary pages, GQA, window, soft cap."""
    kernel = jax.jit(functools.partial(cpu_kernels.ragged_paged_attention, sm_scale=0.35, **options))
    for seed, decode_only in ((0, False), (1, True), (2, False)):
        batch = random_batch(shapes, seed, decode_only=decode_only)
        want = ref_ragged_paged_attention(**batch, sm_scale=0.35, **options)
        np.testing.assert_allclose(np.asarray(kernel(**batch)), np.asarray(want), atol=2e-5, rtol=2e-5)


BFLOAT16_CASES = [
    (Shapes(page_size=16, num_kv_heads=3, group=3, num_seq_slots=6, num_tokens=24, pages_per_seq=12,
            head_dim=64, num_pages=80), {}),
    (Shapes(page_size=16, num_kv_heads=1, group=2, num_seq_slots=3, num_tokens=60, pages_per_seq=6,
            head_dim=40, num_pages=40), {"sliding_window": 5, "soft_cap": 20.0}),
    (Shapes(page_size=16, num_kv_heads=1, group=3, num_seq_slots=3, num_tokens=6, pages_per_seq=24,
            head_dim=64, num_pages=80), {}),  # decode positions split into parts
    # rows of 4 x 160 values, past what the kernel widens whole: a KV head at a time
    (Shapes(page_size=16, num_kv_heads=4, group=2, num_seq_slots=3, num_tokens=12, pages_per_seq=6,
            head_dim=160, num_pages=40), {}),
]


def _with_extremes(pages, dtype, seed, largest: bool):
    """A float8 cache's values with some of the format's subnormals, negative zeros and (`largest`) largest
    values (planted in V pages only: scores that large would make the comparison one of rounding orders)."""
    if jnp.dtype(dtype).itemsize != 1:
        return pages
    finfo = jnp.finfo(dtype)
    rng = np.random.default_rng(seed)
    values = np.asarray(pages, np.float32).copy()
    pick = lambda: rng.random(values.shape) < 0.05
    values[pick()] *= float(finfo.smallest_normal) / 4  # subnormal after the cast (or zero)
    if largest:
        values[pick()] = -float(finfo.max)
        values[pick()] = float(finfo.max) * 1.01  # saturates
    values[pick()] = -0.0
    return jnp.asarray(values)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("shapes,options", BFLOAT16_CASES)
def test_attention_kernel_reads_a_narrow_cache(shapes, options, dtype):
    """A bfloat16 or float8 cache gives what the reference gives on the same (rounded) values, widened exactly
    (float8's subnormals, largest values and signed zeros included). The float32 products: AMX tiles' are
    checked below."""
    kernel = jax.jit(functools.partial(cpu_kernels.ragged_paged_attention, sm_scale=0.35, tiles=False, **options))
    for seed, decode_only in ((0, False), (1, True)):
        batch = random_batch(shapes, seed, decode_only=decode_only)
        rounded = {**batch, "k_pages": cast_to_cache(_with_extremes(batch["k_pages"], dtype, seed, False), dtype),
                   "v_pages": cast_to_cache(_with_extremes(batch["v_pages"], dtype, seed + 7, True), dtype)}
        assert not np.isnan(np.asarray(rounded["v_pages"], np.float32)).any()  # saturated, not NaN
        widened = {**rounded, "k_pages": rounded["k_pages"].astype(jnp.float32),
                   "v_pages": rounded["v_pages"].astype(jnp.float32)}
        want = ref_ragged_paged_attention(**widened, sm_scale=0.35, **options)
        largest = 1.0  # float8's largest planted values cancel: the tolerance scales with them
        if jnp.dtype(dtype).itemsize == 1:
            largest = max(1.0, float(jnp.abs(widened["v_pages"]).max()) / 8)
        np.testing.assert_allclose(np.asarray(kernel(**rounded)), np.asarray(want), atol=2e-5 * largest, rtol=2e-5)
    assert cpu_kernels.attention_fits(batch["q"], rounded["k_pages"])
    assert not cpu_kernels.attention_fits(batch["q"], batch["k_pages"].astype(jnp.float16))


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_attention_kernel_widens_every_float8_value_exactly(dtype):
    """Sequences of one position return that position's V row as it is: every finite float8 code, each through
    the kernel's widening, comes back as JAX's float32 of it."""
    codes = np.arange(256, dtype=np.uint8).view(jnp.dtype(dtype))
    codes = codes[np.isfinite(codes.astype(np.float32))]
    head_dim = 64
    rows = np.zeros((-(-codes.size // head_dim) * head_dim,), codes.dtype)
    rows[:codes.size] = codes
    seqs = rows.size // head_dim
    v_pages = np.zeros((seqs + 1, 8, 1, head_dim), codes.dtype)
    v_pages[1:, 0, 0, :] = rows.reshape(seqs, head_dim)  # sequence s reads page s + 1
    out = cpu_kernels.ragged_paged_attention(
        jnp.ones((seqs, 1, head_dim), jnp.float32), jnp.zeros(v_pages.shape, dtype), jnp.asarray(v_pages),
        jnp.ones((seqs,), jnp.int32), jnp.arange(1, seqs + 1, dtype=jnp.int32)[:, None],
        jnp.arange(seqs + 1, dtype=jnp.int32), jnp.asarray([seqs], jnp.int32), sm_scale=0.5)
    np.testing.assert_array_equal(np.asarray(out).reshape(-1), rows.astype(np.float32))


def test_attention_dispatch_sends_cpu_steps_to_the_kernel():
    shapes = Shapes(page_size=4, num_kv_heads=2, group=2, num_seq_slots=5, num_tokens=5, pages_per_seq=5)
    lower = lambda batch, backend: jax.jit(functools.partial(
        ragged_paged_attention, sm_scale=0.35, backend=backend)).lower(**batch).as_text()
    decode = random_batch(shapes, 0, decode_only=True)
    mixed = random_batch(dataclasses.replace(shapes, num_tokens=20), 0)  # prefill chunks too
    for batch in (decode, mixed):
        assert "jaxserve_ragged_paged_attention" in lower(batch, "cpu")
        assert "jaxserve_ragged_paged_attention" not in lower(batch, "xla")
    odd_heads = random_batch(dataclasses.replace(shapes, head_dim=12), 0)  # not a multiple of 8: XLA's path
    assert "jaxserve_ragged_paged_attention" not in lower(odd_heads, "cpu")


def test_int8_rounding_is_exact_in_bfloat16_and_close_to_the_weights():
    w = np.random.default_rng(5).standard_normal((96, 40)).astype(np.float32) * np.linspace(0.01, 3, 40)
    w[:, 7] = 0.0  # an all-zero column
    q, scale = cpu_kernels.quantize_int8(w)
    assert q.dtype == np.int8 and np.abs(q.astype(np.int32)).max() <= 127 and scale.shape == (40,)
    assert np.all(np.log2(scale) == np.round(np.log2(scale)))  # powers of two
    rounded = q.astype(np.float32) * scale
    assert np.array_equal(np.asarray(jnp.asarray(rounded, jnp.bfloat16), np.float32), rounded)
    assert np.all(np.abs(rounded - w) <= scale / 2 + 1e-12)
    q2, scale2 = cpu_kernels.quantize_int8(jnp.asarray(rounded, jnp.bfloat16))  # idempotent, and on device
    assert np.array_equal(np.asarray(q2), q) and np.array_equal(np.asarray(scale2), scale)


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (2, 130, 40), (3, 7, 3)])
def test_int8_kernel_equals_xla_on_the_rounded_weights(m, k, n):
    rng = np.random.default_rng(k + n)
    q, scale = cpu_kernels.quantize_int8(rng.standard_normal((k, n)).astype(np.float32))
    x = bf16(rng, m, k)
    got = jax.jit(cpu_kernels.int8_matmul)(x, q, scale)
    want = cpu_kernels.matmul(x, jnp.asarray(q.astype(np.float32) * scale, jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_int8_engine_steps_agree_across_kernel_and_xla_paths(random_llama_dir):
    """Small decode steps multiply int8 weights in the kernel, larger ones the same values in bf16 on XLA."""
    llm = LLM(model=str(random_llama_dir), quantization="int8", checkpoint_cache_dir=None, precompile=False,
              max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, block_size=4)
    runner = llm.engine.runner
    assert runner.config.int8_weights and runner.params[2][0][1].dtype == jnp.int8
    rng = np.random.default_rng(4)
    prompts = [rng.integers(100, 40000, size=int(rng.integers(3, 30))).tolist() for _ in range(3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    alone = [llm.generate([p], params)[0] for p in prompts]  # 2-sequence buckets: unrolled, int8 kernel
    together = llm.generate(prompts, params)  # a 4-sequence bucket: scanned, XLA on the rounded bf16 weights
    for a, b in zip(alone, together):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        np.testing.assert_allclose(a.outputs[0].cumulative_logprob, b.outputs[0].cumulative_logprob, atol=1e-3)
    with pytest.raises(ValueError, match="quantization int8 needs"):
        LLM(model=str(random_llama_dir), quantization="int8", dtype="float32", precompile=False, max_model_len=64)
    with pytest.raises(ValueError, match="quantization must be"):
        LLM(model=str(random_llama_dir), quantization="int4", precompile=False, max_model_len=64)


def test_an_unloadable_library_turns_the_kernels_off(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_KERNEL_CACHE", str(tmp_path))
    cpu_kernels._library_path().write_bytes(b"not a shared object")
    cpu_kernels._library.cache_clear()
    try:
        assert cpu_kernels.available() is False
    finally:
        monkeypatch.undo()
        cpu_kernels._library.cache_clear()
        assert cpu_kernels.available()  # the real library again, for the tests after this one


@pytest.mark.parametrize("shapes,options", BFLOAT16_CASES + [case for case in ATTENTION_CASES
                                                             if case[0].head_dim % 32 == 0])
def test_attention_in_amx_tiles_rounds_only_queries_and_weights(shapes, options):
    """With its products in AMX tiles the kernel rounds the queries and the softmax weights to bfloat16 for
    them: against the reference on bf16-rounded queries, only the weights' rounding (a relative 2^-9 each)
    is left, and without the rounded queries the error is bf16-sized, not more. Pages of 8 put a tile's 16
    positions in two pages (copied, not loaded in place)."""
    if not cpu_kernels.attention_in_tiles():
        pytest.skip("no AMX tiles here")
    kernel = jax.jit(functools.partial(cpu_kernels.ragged_paged_attention, sm_scale=0.35, tiles=True, **options))
    for seed, decode_only in ((0, False), (1, True)):
        batch = random_batch(shapes, seed, decode_only=decode_only)
        pages = {name: cast_to_cache(batch[name], "bfloat16") for name in ("k_pages", "v_pages")}
        got = np.asarray(kernel(**{**batch, **pages}))
        widened = {name: page.astype(jnp.float32) for name, page in pages.items()}
        q_rounded = batch["q"].astype(jnp.bfloat16).astype(jnp.float32)
        want = np.asarray(ref_ragged_paged_attention(**{**batch, **widened, "q": q_rounded}, sm_scale=0.35,
                                                     **options))
        largest = float(jnp.abs(widened["v_pages"]).max())
        np.testing.assert_allclose(got, want, atol=2.0 ** -8 * largest, rtol=0)
        exact_q = np.asarray(ref_ragged_paged_attention(**{**batch, **widened}, sm_scale=0.35, **options))
        np.testing.assert_allclose(got, exact_q, atol=2.0 ** -5 * largest, rtol=0)
        assert not np.array_equal(got, exact_q) or shapes.head_dim % 32  # the tiles did run (head_dim 40: not)


@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("options", [{}, {"sliding_window": 100}])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_attention_a_token_gets_the_same_sums_in_any_step(options, heads, kv_heads, tiles):
    """A decoding token's output is bit-identical alone, among other sequences (few or many, which once
    changed how its positions were split over the threads), as the last token of a prefill chunk (where
    it shares the kernel's lanes with other tokens' heads: with grouped or one query head per KV head) and of
    a short query block (a token with its drafts) that few sequences share the step with."""
    rng = np.random.default_rng(0)
    page_size, pages_per_seq, dim = 16, 20, 64
    kv_lens = [37, 130, 200, 260, 64, 129, 300, 9]
    k_pages, v_pages = (jnp.asarray(rng.standard_normal((200, page_size, kv_heads, dim)), jnp.bfloat16)
                        for _ in range(2))
    tables = np.stack([rng.choice(np.arange(1, 200), pages_per_seq, replace=False) for _ in kv_lens]).astype(np.int32)
    q = rng.standard_normal((len(kv_lens), heads, dim)).astype(np.float32)
    kernel = jax.jit(functools.partial(cpu_kernels.ragged_paged_attention, sm_scale=0.125, tiles=tiles,
                                       **options))

    def run(seqs, q_lens, slots=8):
        """Sequences `seqs` with their query lengths; the last query token of each is q[s]."""
        tokens = []
        for s, n in zip(seqs, q_lens):
            tokens += [rng.standard_normal((n - 1, heads, dim)).astype(np.float32), q[s][None]]
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        cu = np.pad(cu, (0, slots + 1 - len(cu)), mode="edge")
        pad = lambda a: np.pad(a, [(0, slots - len(seqs))] + [(0, 0)] * (a.ndim - 1))
        out = kernel(jnp.asarray(np.concatenate(tokens)), k_pages, v_pages,
                     jnp.asarray(pad(np.array([kv_lens[s] for s in seqs], np.int32))),
                     jnp.asarray(pad(tables[seqs])), jnp.asarray(cu), jnp.asarray([len(seqs)], jnp.int32))
        return np.asarray(out)[cu[1:len(seqs) + 1] - 1]  # each sequence's last token

    together = run(list(range(8)), [1] * 8)
    for s in range(8):
        np.testing.assert_array_equal(run([s], [1]), together[s:s + 1])
        np.testing.assert_array_equal(run([s, (s + 1) % 8], [1, 1]), together[[s, (s + 1) % 8]])
        for chunk in (9, 10, 11, 17, 18):  # the end of a prefill chunk, after others in its query block (of 8 or
            # 16 tokens: AMX tiles take 16)
            np.testing.assert_array_equal(run([s], [chunk]), together[s:s + 1])
        for q_len in (2, 5, 8):  # a decoding token after its drafts' rows: one query block, split by its parts
            np.testing.assert_array_equal(run([s], [q_len]), together[s:s + 1])
            np.testing.assert_array_equal(run([s, (s + 1) % 8], [q_len, 3]), together[[s, (s + 1) % 8]])


def test_the_avx2_attention_a_faster_cpu_skips_still_holds():
    """On an AVX-512 CPU the attention tests above run cpu_attention_avx512.cc; the AVX2 kernel, which other
    CPUs take, is checked here with it switched off (reference sums, and a token's sums in any step)."""
    if not cpu_kernels.has_avx512_attention():
        pytest.skip("this CPU takes the AVX2 kernel anyway")
    env = {**os.environ, "JAXSERVE_CPU_AVX512": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__,
         "-k", "attention_kernel_matches or narrow_cache or same_sums_in_any_step"],
        env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]


def test_the_start_up_log_names_the_attention_kernel():
    from jaxserve.engine_setup import describe_attention
    assert describe_attention("xla", "bfloat16", 64) == "xla"
    wide = "AVX-512" if cpu_kernels.has_avx512_attention() else "AVX2"
    tiles = ", AMX tiles" if cpu_kernels.attention_in_tiles() else ""
    assert describe_attention("cpu", "bfloat16", 64) == f"cpu ({wide}{tiles})"
    assert describe_attention("cpu", "float32", 64) == f"cpu ({wide})"
    assert describe_attention("cpu", "float8_e4m3fn", 64) == "cpu (AVX2)"  # float8 pages: the AVX2 kernel
    assert describe_attention("cpu", "float32", 80) == "cpu (AVX2)"  # head_dim not a multiple of 32
