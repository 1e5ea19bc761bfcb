"""Int8 rows (pallas_kernels/int8_rows): the AMX int8 kernel against its pure-JAX reference, bit for bit."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.pallas_kernels import int8_rows

needs_kernel = pytest.mark.skipif(not int8_rows.available(), reason="needs AMX int8 tiles")


def _weight(rng, n, k):
    return int8_rows.pack(rng.standard_normal((n, k)).astype(np.float32) * 0.05)


def test_rotation_is_orthonormal_and_its_own_inverse():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    r = int8_rows.rotate(x)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(int8_rows.rotate(r), x, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(int8_rows.rotate(jnp.asarray(x))), r)  # numpy and JAX agree
    np.testing.assert_allclose(int8_rows._rotate_fast(x), r, atol=1e-5)  # the load-time matrix form
    # a lone spike spreads evenly over its own 64-value block and no further
    spike = np.zeros((1, 128), np.float32)
    spike[0, 70] = 8.0
    np.testing.assert_array_equal(np.abs(int8_rows.rotate(spike))[0], [0.0] * 64 + [1.0] * 64)


def test_pack_keeps_the_weight_and_lookup_reads_its_rows():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 192)).astype(np.float32)
    packed = int8_rows.pack(w)
    assert packed["qweight"].shape == (3, 192 * 16) and packed["qweight"].dtype == np.int8
    assert packed["scales"].shape == (3, 16)
    back = np.asarray(int8_rows.dequantize(packed["qweight"], packed["scales"]))
    # one step of a row's int8 grid, in the rotated basis, bounds each value's error
    assert np.abs(back - w).max() < 0.02 * np.abs(w).max()
    ids = np.array([0, 17, 47, 17])
    np.testing.assert_array_equal(np.asarray(int8_rows.lookup_rows(jnp.asarray(packed["qweight"]),
                                                                   jnp.asarray(packed["scales"]), ids)), back[ids])
    assert not int8_rows.fits(40, 192) and not int8_rows.fits(48, 96) and int8_rows.fits(48, 192)


@needs_kernel
@pytest.mark.parametrize("n,k", [(64, 128), (96, 576), (48, 64)])
def test_kernel_matches_reference_exactly(n, k):
    rng = np.random.default_rng(2)
    packed = _weight(rng, n, k)
    q, s = jnp.asarray(packed["qweight"]), jnp.asarray(packed["scales"])
    for m in (1, 3, 16, 17, 33, 130):
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[0, 5] = 40.0  # an outlier
        want = np.asarray(int8_rows.reference_matmul(x, q, s))
        np.testing.assert_array_equal(np.asarray(int8_rows.matmul(jnp.asarray(x), q, s)), want)
        np.testing.assert_array_equal(np.asarray(int8_rows.matmul(jnp.asarray(x), q, s, argmax=True)),
                                      want.argmax(axis=1))
        if n % 32 == 0:
            gated = np.asarray(int8_rows.matmul(jnp.asarray(x), q, s, gated=True))
            np.testing.assert_allclose(gated, jax.nn.silu(want[:, : n // 2]) * want[:, n // 2:], rtol=1e-5, atol=1e-6)


@needs_kernel
def test_a_row_gets_the_same_outputs_alone_and_in_any_batch():
    rng = np.random.default_rng(3)
    packed = _weight(rng, 96, 576)
    q, s = jnp.asarray(packed["qweight"]), jnp.asarray(packed["scales"])
    x = rng.standard_normal((70, 576)).astype(np.float32)
    batched = np.asarray(int8_rows.matmul(jnp.asarray(x), q, s))
    gated = np.asarray(int8_rows.matmul(jnp.asarray(x), q, s, gated=True))
    for i in (0, 15, 16, 31, 69):
        np.testing.assert_array_equal(np.asarray(int8_rows.matmul(jnp.asarray(x[i:i + 1]), q, s))[0], batched[i])
        np.testing.assert_array_equal(np.asarray(int8_rows.matmul(jnp.asarray(x[i:i + 1]), q, s, gated=True))[0],
                                      gated[i])


@needs_kernel
def test_rows_layers_and_special_values():
    rng = np.random.default_rng(4)
    layers = [_weight(rng, 64, 128) for _ in range(3)]
    q = jnp.asarray(np.stack([p["qweight"] for p in layers]))
    s = jnp.asarray(np.stack([p["scales"] for p in layers]))
    x = rng.standard_normal((5, 128)).astype(np.float32)
    x[1] = 0.0
    x[2, 7] = np.nan
    x[3, 9] = np.inf
    y = np.asarray(int8_rows.matmul(jnp.asarray(x), q, s, layer=2, rows=4))
    want = np.asarray(int8_rows.reference_matmul(x, layers[2]["qweight"], layers[2]["scales"]))
    np.testing.assert_array_equal(y[0], want[0])
    assert (y[1] == 0).all() and np.isnan(y[2:4]).all() and np.isnan(want[2:4]).all()
    assert (y[4] == 0).all()  # past `rows`
    am = np.asarray(int8_rows.matmul(jnp.asarray(x), q, s, layer=2, rows=4, argmax=True))
    assert am[2] == 63 and am[4] == 0 and am[0] == want[0].argmax()


@needs_kernel
def test_w8a8_engine_is_batch_invariant_and_close_to_the_dequantized_model(tmp_path):
    from test_block_quant import write_q4_k_gguf

    from jaxserve import LLM, SamplingParams
    from jaxserve.engine_setup import int8_rows_formats, resolve_block_formats
    from jaxserve.models.weights import default_gguf_path, resolve_model_source

    write_q4_k_gguf(tmp_path / "k.gguf", np.random.default_rng(11))
    kw = dict(model=str(tmp_path / "k.gguf"), tokenizer=default_gguf_path(), checkpoint_cache_dir=None,
              precompile=False, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
              kv_cache_dtype="float32", dtype="float32")
    w8a8, dense = LLM(quantization="w8a8", **kw), LLM(quantization="none", **kw)
    formats = dict(w8a8.engine.runner.config.block_formats)
    assert set(formats.values()) == {"int8_rows"} and {"q_proj", "down_proj", "embed_tokens"} <= set(formats)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 60, size=int(rng.integers(2, 14))).tolist() for _ in range(3)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
    together = w8a8.generate(prompts, params)
    for prompt, batched in zip(prompts, together):  # exact integer sums: the same alone and batched
        alone = w8a8.generate([prompt], params)[0].outputs[0]
        assert alone.token_ids == batched.outputs[0].token_ids
        assert [{t: lp.logprob for t, lp in step.items()} for step in alone.logprobs] == \
               [{t: lp.logprob for t, lp in step.items()} for step in batched.outputs[0].logprobs]
    first = dense.generate(prompts, SamplingParams(temperature=0, max_tokens=1, logprobs=3))
    # int8 weights and activations: close, not equal. A random model's logits are large (its top logprobs
    # here run from -1e-4 to -13), so its rank-2 and -3 logprobs move by up to ~0.8.
    for got, want in zip(together, first):
        assert got.outputs[0].token_ids[0] == want.outputs[0].token_ids[0]
        for token, lp in want.outputs[0].logprobs[0].items():
            assert abs(got.outputs[0].logprobs[0][token].logprob - lp.logprob) < (0.1 if lp.rank == 1 else 1.0)
    source, cfg = resolve_model_source(kw["model"]), w8a8.engine.model_config
    with pytest.raises(ValueError, match="w8a8 needs one CPU device with AMX int8 tiles"):
        resolve_block_formats("w8a8", source, False, cfg, "float32")
    # unset: a GGUF running in bfloat16 takes int8 rows here; --dtype float32 keeps the file's blocks
    assert set(dict(resolve_block_formats(None, source, True, cfg, "bfloat16")).values()) == {"int8_rows"}
    assert set(dict(resolve_block_formats(None, source, True, cfg, "float32")).values()) == {"q4"}
    # a module that does not fit int8 rows keeps the file's blocks; a fused part that does not, its group too
    odd = dataclasses.replace(cfg, intermediate_size=cfg.intermediate_size + 8)
    fallback = {"gate_proj": "q4", "up_proj": "q4", "down_proj": "q4"}
    formats = dict(int8_rows_formats(odd, fallback))
    assert formats["gate_proj"] == formats["up_proj"] == "q4" and formats["down_proj"] == "q4"
    assert formats["q_proj"] == formats["o_proj"] == "int8_rows"
