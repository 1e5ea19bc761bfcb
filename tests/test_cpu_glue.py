"""The CPU kernels between a layer's projections (pallas_kernels/cpu_glue.cc): RMSNorm with the residual add,
RoPE with the KV write, against the XLA path they replace (models/llama, pallas_kernels/attention.write_kv)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.models.llama import RMSNorm, apply_rope, rope_inv_freq, rope_tables
from jaxserve.pallas_kernels import cpu_kernels
from jaxserve.pallas_kernels.attention import write_kv

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler or no AVX2 here")

EPS = 1e-5


def _norm(hidden: int, rng) -> RMSNorm:
    norm = RMSNorm(hidden, EPS, jnp.bfloat16)
    norm.weight[...] = jnp.asarray(rng.standard_normal(hidden, dtype=np.float32), jnp.bfloat16)
    return norm


@pytest.mark.parametrize("hidden", [576, 64, 100])
def test_add_rms_norm_matches_the_xla_norm_and_zeroes_padding(hidden):
    rng = np.random.default_rng(hidden)
    norm = _norm(hidden, rng)
    x, delta = (jnp.asarray(rng.standard_normal((37, hidden), dtype=np.float32) * 3) for _ in range(2))
    total, normed = jax.jit(lambda x, d: norm.on_cpu(x, jnp.array([30]), d))(x, delta)
    assert np.array_equal(np.asarray(total[:30]), np.asarray((x + delta)[:30]))
    # The same operations but XLA's approximate rsqrt: an ulp or so apart.
    want = jax.jit(norm)(x + delta)
    np.testing.assert_allclose(np.asarray(normed[:30]), np.asarray(want[:30]), rtol=1e-6, atol=1e-6)
    assert not np.asarray(total[30:]).any() and not np.asarray(normed[30:]).any()


def test_a_rows_norm_does_not_depend_on_its_batch():
    rng = np.random.default_rng(2)
    norm = _norm(576, rng)
    x, delta = (jnp.asarray(rng.standard_normal((64, 576), dtype=np.float32)) for _ in range(2))
    batch = np.asarray(jax.jit(lambda x, d: norm.on_cpu(x, jnp.array([64]), d)[1])(x, delta))
    for row in (0, 17, 63):
        alone = jax.jit(lambda x, d: norm.on_cpu(x, jnp.array([1]), d)[1])(x[row:row + 1], delta[row:row + 1])
        assert np.array_equal(np.asarray(alone)[0], batch[row])


def _rope_case(rng, page_dtype, tokens=37, heads=9, kv_heads=3, head_dim=64, pages=40, page_size=16):
    qkv = jnp.asarray(rng.standard_normal((tokens, (heads + 2 * kv_heads) * head_dim), dtype=np.float32))
    positions = jnp.asarray(rng.integers(0, 4000, tokens), jnp.int32)
    k_pages = jnp.asarray(rng.standard_normal((pages, page_size, kv_heads, head_dim), dtype=np.float32), page_dtype)
    slots = jnp.asarray(rng.permutation(pages * page_size)[:tokens], jnp.int32)
    cfg = ModelConfig(architecture="llama", vocab_size=10, hidden_size=heads * head_dim, intermediate_size=8, num_layers=1,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=500000.0)
    return qkv, positions, k_pages, k_pages * 2, slots, cfg


@pytest.mark.parametrize("page_dtype", [jnp.bfloat16, jnp.float32])
def test_rope_write_kv_equals_rope_then_the_xla_write(page_dtype):
    rng = np.random.default_rng(3)
    qkv, positions, k_pages, v_pages, slots, cfg = _rope_case(rng, page_dtype)
    t, h, hkv, d = qkv.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inv_freq = rope_inv_freq(cfg)

    def xla_path(qkv, k_pages, v_pages):
        q, k, v = jnp.split(qkv, [h * d, (h + hkv) * d], axis=-1)
        q, k = apply_rope(q.reshape(t, h, d), positions, inv_freq), apply_rope(k.reshape(t, hkv, d), positions, inv_freq)
        return (q, *write_kv(k_pages, v_pages, k, v.reshape(t, hkv, d), slots))

    def kernel_path(qkv, k_pages, v_pages):
        cos, sin = rope_tables(positions, inv_freq)
        return cpu_kernels.rope_write_kv(qkv, cos, sin, slots, k_pages, v_pages, jnp.array([t]), h)

    want = jax.jit(xla_path)(qkv, k_pages, v_pages)
    got = jax.jit(kernel_path, donate_argnums=(1, 2))(qkv, jnp.copy(k_pages), jnp.copy(v_pages))
    for g, w in zip(got, want):  # bit for bit: the same operations, and untouched slots keep their values
        assert g.dtype == w.dtype and np.array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_rope_write_kv_padding_rows_write_nothing():
    rng = np.random.default_rng(4)
    qkv, positions, k_pages, v_pages, slots, cfg = _rope_case(rng, jnp.bfloat16)
    cos, sin = rope_tables(positions, np.ones(cfg.head_dim // 2, np.float32))
    q, k_out, v_out = jax.jit(lambda *a: cpu_kernels.rope_write_kv(*a, jnp.array([10]), cfg.num_heads))(
        qkv, cos, sin, slots, jnp.copy(k_pages), jnp.copy(v_pages))
    assert not np.asarray(q[10:]).any() and np.asarray(q[:10]).any()
    flat = lambda pages: np.asarray(pages, np.float32).reshape(-1, cfg.num_kv_heads, cfg.head_dim)
    untouched = np.setdiff1d(np.arange(flat(k_pages).shape[0]), np.asarray(slots[:10]))
    assert np.array_equal(flat(k_out)[untouched], flat(k_pages)[untouched])
    assert np.array_equal(flat(v_out)[untouched], flat(v_pages)[untouched])
    assert not np.array_equal(flat(k_out)[np.asarray(slots[:10])], flat(k_pages)[np.asarray(slots[:10])])


def test_rope_write_kv_refuses_a_slot_outside_the_cache():
    rng = np.random.default_rng(5)
    qkv, positions, k_pages, v_pages, slots, cfg = _rope_case(rng, jnp.bfloat16, tokens=4)
    cos, sin = rope_tables(positions, np.ones(cfg.head_dim // 2, np.float32))
    bad = slots.at[2].set(k_pages.shape[0] * k_pages.shape[1])
    with pytest.raises(Exception, match="slot out of range"):
        jax.block_until_ready(cpu_kernels.rope_write_kv(qkv, cos, sin, bad, k_pages, v_pages, jnp.array([4]),
                                                        cfg.num_heads))


def test_the_engine_step_runs_the_glue_kernels(random_llama_dir):
    """One CPU device with the kernels: every step's norms go through them, and RoPE with the KV write where q/k/v
    are one block-format projection (bfloat16 blocks on AMX CPUs, GGUF's blocks anywhere)."""
    from jaxserve import LLM
    from jaxserve.buckets import StepShape
    from jaxserve.model_runner import _layout

    llm = LLM(model=str(random_llama_dir), dtype="bfloat16", checkpoint_cache_dir=None, precompile=False,
              max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, block_size=4)
    runner = llm.engine.runner
    formats = dict(runner.config.block_formats)
    fused_qkv = formats.get("q_proj") is not None and formats.get("q_proj") == formats.get("k_proj") == formats.get("v_proj")
    for shape in (StepShape(16, 4), StepShape(4, 4)):
        packed = np.zeros(sum(size for _, size in _layout(shape, runner.config.pages_per_seq).values()), np.int32)
        hlo = runner.step_fn(shape).lower(*runner.step_params(shape), runner.kv_cache, packed,
                                          runner.no_previous_tokens).as_text()
        assert hlo.count("jaxserve_add_rms_norm") >= 2  # a layer's two norms (the scan's body, or each layer)
        assert ("jaxserve_rope_write_kv" in hlo) == fused_qkv
