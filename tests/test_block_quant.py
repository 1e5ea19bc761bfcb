"""GGUF weights kept in their blocks (pallas_kernels/block_quant): the kernels against the pure-JAX reference,
the packing against gguf's own dequantizer, loading, and whole-engine agreement with dequantized weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
import test_weights
from test_weights import NH, NKV, write_tiny_gguf

from jaxserve import LLM, SamplingParams
from jaxserve.models.gguf_reader import block_formats, iter_gguf_hf_tensors, read_gguf_header
from jaxserve.models.llama import fixed_order_sum
from jaxserve.models.weights import default_gguf_path
from jaxserve.pallas_kernels import block_quant, cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels do not build here")


def random_blocks(rng, fmt: str, n: int, k: int, layers: int | None = None):
    """Tiled weights of random values (stacked over `layers` when given)."""
    def one():
        blocks = k // block_quant.BLOCK
        scales = rng.uniform(0.001, 0.02, (n, blocks)).astype(np.float32)
        if fmt == "q4":
            return block_quant.tile({"qweight": rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8),
                                     "scales": scales, "mins": rng.uniform(-0.1, 0.0, (n, blocks)).astype(np.float32)})
        return block_quant.tile({"qweight": rng.integers(-127, 128, (n, blocks, 32), dtype=np.int8), "scales": scales})
    if layers is None:
        return one()
    stacked = [one() for _ in range(layers)]
    return {name: np.stack([w[name] for w in stacked]) for name in stacked[0]}


def weights_args(w):
    return w["qweight"], w["scales"], w.get("mins")


@pytest.mark.parametrize("fmt", ["q4", "q8"])
# Rows on both sides of FLOAT_MIN_ROWS (12): integer dots below it, float32 panels from it (with an odd tile).
@pytest.mark.parametrize("m,n,k", [(1, 64, 576), (3, 130, 1536), (9, 34, 64), (11, 34, 576), (14, 34, 576),
                                   (70, 18, 96)])
def test_kernel_matches_the_reference(fmt, m, n, k):
    rng = np.random.default_rng(m * n + k)
    w = random_blocks(rng, fmt, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = np.asarray(jax.jit(block_quant.matmul)(x, *weights_args(w)))
    want = np.asarray(block_quant.reference_matmul(x, *weights_args(w)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # The reference is a product with the dequantized weights, up to the activations. ~14-bit rounding.
    exact = x @ block_quant.dequantize(*weights_args(w)).T
    assert np.abs(want - exact).max() < 0.02 * np.abs(exact).max()
    if m >= block_quant.FLOAT_MIN_ROWS:  # float32 panels: the activations are not rounded
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    # Rows past `rows` (a step's padding) are not computed and come out zero; the others are unchanged.
    live = max(m - 2, 0)
    partial = np.asarray(block_quant.matmul(x, *weights_args(w), rows=jnp.asarray([live], jnp.int32)))
    np.testing.assert_array_equal(partial[:live], got[:live])
    assert not partial[live:].any()


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_stacked_weights_are_read_at_the_layer_index(fmt):
    rng = np.random.default_rng(7)
    w = random_blocks(rng, fmt, 32, 64, layers=3)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    step = jax.jit(lambda x, layer, q, s, mn: block_quant.matmul(x, q, s, mn, layer))
    for layer in range(3):
        got = step(x, jnp.int32(layer), *weights_args(w))
        want = block_quant.reference_matmul(x, *weights_args({k: v[layer] for k, v in w.items()}))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_many_rows_multiply_the_unpacked_weights(fmt):
    rng = np.random.default_rng(11)
    w = random_blocks(rng, fmt, 48, 96, layers=2)
    for layer in range(2):
        np.testing.assert_array_equal(np.asarray(block_quant.dequantize_layer(*weights_args(w), layer)),
                                      block_quant.dequantize(*weights_args({k: v[layer] for k, v in w.items()})))
    rows = block_quant.DENSE_MIN_ROWS
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    got = np.asarray(jax.jit(block_quant.project)(x, *weights_args(w), 1))
    exact = x @ block_quant.dequantize(*weights_args({k: v[1] for k, v in w.items()})).T
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    fewer = np.asarray(jax.jit(block_quant.project)(x[:rows - 1], *weights_args(w), 1))  # float32 panels
    np.testing.assert_allclose(fewer, exact[:rows - 1], rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    few = block_quant.FLOAT_MIN_ROWS - 1  # integer dots: the activations' ~14-bit rounding shows
    integer = np.asarray(jax.jit(block_quant.project)(x[:few], *weights_args(w), 1))
    assert 0 < np.abs(integer - exact[:few]).max() < 2e-4 * np.abs(exact).max()


@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("m", [1, 2, 7, 13, 31, 70])
def test_bf16_panels_multiply_the_rounded_values_at_every_size(fmt, m):
    """bf16=True on CPUs with AVX512-BF16: at any rows, x and the weights rounded to bfloat16 and summed in
    float32, and each row's result the same whatever rows share the call (elsewhere the float32 panels from
    FLOAT_MIN_ROWS, exact; the integer dots below)."""
    rng = np.random.default_rng(m)
    w = random_blocks(rng, fmt, 42, 128)
    x = rng.standard_normal((m, 128)).astype(np.float32)
    call = jax.jit(lambda x, q, s, mn: block_quant.matmul(x, q, s, mn, bf16=True))
    got = np.asarray(call(x, *weights_args(w)))
    bf16 = cpu_kernels.has_fast_bf16_dots()
    want = np.asarray(block_quant.reference_matmul(x, *weights_args(w), bf16=bf16))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    exact = x @ block_quant.dequantize(*weights_args(w)).T
    error = np.abs(got - exact).max() / np.abs(exact).max()
    if bf16:
        assert 1e-4 < error < 2e-2
        for i in range(m):  # a row alone, and with its padding
            np.testing.assert_array_equal(np.asarray(call(x[i:i + 1], *weights_args(w))), got[i:i + 1])
    else:  # float32 panels (exact) or the integer dots (~14-bit activations)
        assert error < (1e-5 if m >= block_quant.FLOAT_MIN_ROWS else 2e-4)
    live = max(m - 2, 0)
    partial = np.asarray(block_quant.matmul(x, *weights_args(w), rows=jnp.asarray([live], jnp.int32), bf16=True))
    if bf16 or (live >= block_quant.FLOAT_MIN_ROWS) == (m >= block_quant.FLOAT_MIN_ROWS):  # the same path
        np.testing.assert_array_equal(partial[:live], got[:live])
    assert not partial[live:].any()


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_bf16_projections_never_take_the_dense_path(fmt):
    """In bfloat16, `project` keeps long steps in the kernel's panels (XLA's dot would give a long prompt's
    rows other sums than the same rows in a short step); the kernel's bfloat16 unpacking, still used by
    dequantize_layer, rounds scale * q + min to nearest even."""
    rng = np.random.default_rng(5)
    w = random_blocks(rng, fmt, 40, 96, layers=2)
    one = {k: v[1] for k, v in w.items()}
    unpacked = np.asarray(block_quant.dequantize_layer(*weights_args(w), 1, dtype=jnp.bfloat16))
    rounded = np.asarray(jnp.asarray(block_quant.dequantize(*weights_args(one)), jnp.bfloat16))
    np.testing.assert_array_equal(unpacked.view(np.uint16), rounded.view(np.uint16))
    if not cpu_kernels.has_fast_bf16_dots():  # no bfloat16 panels here: a bfloat16 model's steps stay float32
        return
    rows = block_quant.DENSE_MIN_ROWS + 3
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    project = jax.jit(lambda x, q, s, mn: block_quant.project(x, q, s, mn, 1, dense_dtype=jnp.bfloat16))
    got = np.asarray(project(x, *weights_args(w)))
    want = np.asarray(block_quant.reference_matmul(x, *weights_args(one), bf16=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(project(x[:3], *weights_args(w))), got[:3])


def test_dense_dtype_follows_the_weights_dtype_and_the_cpu():
    assert block_quant.dense_dtype(jnp.float32) == jnp.float32
    expected = jnp.bfloat16 if cpu_kernels.has_fast_bf16_dots() else jnp.float32
    assert block_quant.dense_dtype(jnp.bfloat16) == expected


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_packed_blocks_dequantize_like_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    w = rng.uniform(-1, 1, (6, 96)).astype(np.float32)
    raw = quantize(w, qtype)
    packed = block_quant.tile(block_quant.pack_gguf(raw, qtype.name))
    want = dequantize(raw, qtype).reshape(w.shape)
    np.testing.assert_array_equal(block_quant.dequantize(*weights_args(packed)), want)
    ids = jnp.asarray([5, 0, 3, 3])
    rows = block_quant.lookup_rows(*weights_args(packed), ids)
    np.testing.assert_array_equal(np.asarray(rows), want[np.asarray(ids)])


def test_block_formats_and_loaded_blocks_match_the_dequantized_tensors(tmp_path):
    # test_weights' tiny GGUF mixes types: Q4_0 / Q4_1 / Q8_0 projections, an F16 and a BF16 one, Q8_0
    # embedding, F32 head.
    write_tiny_gguf(tmp_path / "tiny.gguf")
    header = read_gguf_header(str(tmp_path / "tiny.gguf"))
    formats = block_formats(header)
    assert formats == {"embed_tokens": "q8", "q_proj": "q4", "k_proj": "q4", "gate_proj": "q8", "up_proj": "q4",
                       "down_proj": "q4"}
    dense = dict(iter_gguf_hf_tensors(header, NH, NKV))
    blocks = dict(iter_gguf_hf_tensors(header, NH, NKV, keep_blocks=frozenset(formats)))
    assert blocks.keys() == dense.keys()
    for name, value in blocks.items():
        if isinstance(value, dict):  # permuted Q/K rows included
            np.testing.assert_array_equal(block_quant.dequantize(*weights_args(value)), dense[name], err_msg=name)
        else:
            np.testing.assert_array_equal(value, dense[name], err_msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_block_engine_agrees_with_dequantized_weights_and_across_batches(tmp_path, monkeypatch, fused):
    if fused:  # q/k/v and gate/up all 4-bit (Q4_0 and Q4_1 mixed): each group becomes one block weight
        monkeypatch.setitem(test_weights.QUANT_FOR, "v_proj", QT.Q4_0)
        monkeypatch.setitem(test_weights.QUANT_FOR, "gate_proj", QT.Q4_1)
    write_tiny_gguf(tmp_path / "tiny.gguf")
    # Steps of at most 11 tokens: all of them through the integer dots (below FLOAT_MIN_ROWS), whose rows come
    # out the same at any batch size. A float32 KV cache on both sides: the weights' arithmetic is under test.
    kw = dict(model=str(tmp_path / "tiny.gguf"), tokenizer=default_gguf_path(), checkpoint_cache_dir=None,
              precompile=False, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=11, block_size=4,
              kv_cache_dtype="float32")
    blocks = LLM(**kw)
    assert dict(blocks.engine.runner.config.block_formats)["q_proj"] == "q4"
    modules = {str(path[-2]) for path in blocks.engine.runner.split.layer_paths}
    assert {"qkv_proj", "gate_up_proj"} <= modules if fused else not modules & {"qkv_proj", "gate_up_proj"}
    reference = LLM(quantization="none", dtype="float32", **kw)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 60, size=int(rng.integers(2, 11))).tolist() for _ in range(3)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=20)
    together = blocks.generate(prompts, params)
    alone = [blocks.generate([p], params)[0] for p in prompts]
    for a, b in zip(alone, together):  # each row's arithmetic is the same at any batch size
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    dense = reference.generate(prompts, SamplingParams(temperature=0, max_tokens=1, logprobs=3))
    for got, want in zip(together, dense):
        first = want.outputs[0].logprobs[0]
        # The top-3 logprobs of the first step, up to the ~14-bit activations (8-bit ones missed by 0.06 here).
        for token, lp in first.items():
            assert abs(got.outputs[0].logprobs[0][token].logprob - lp.logprob) < 0.03


def test_quantization_choices(random_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="quantization gguf needs a .gguf model"):
        LLM(model=str(random_llama_dir), quantization="gguf", precompile=False, max_model_len=64)
    with pytest.raises(ValueError, match="quantization must be one of gguf, int8, none"):
        LLM(model=str(random_llama_dir), quantization="q4", precompile=False, max_model_len=64)
    write_tiny_gguf(tmp_path / "tiny.gguf")
    dense = LLM(model=str(tmp_path / "tiny.gguf"), tokenizer=default_gguf_path(), quantization="none",
                checkpoint_cache_dir=None, precompile=False, max_model_len=64)
    assert dense.engine.runner.config.block_formats == ()


def test_block_head_computes_only_the_live_rows():
    # The default model's LM head is its tied Q8_0 embedding, block-quantized. Rows past `rows` (a step's
    # padding sequences) come out zero; the live ones are the same as computing every row.
    from jaxserve.models.llama import logits_from_hidden
    llm = LLM(model=default_gguf_path(), max_model_len=64, max_num_seqs=4, precompile=False)
    runner = llm.engine.runner
    hidden = jnp.asarray(np.random.default_rng(0).standard_normal((4, llm.engine.model_config.hidden_size)),
                         runner.activation_dtype)
    head = jax.jit(lambda h, rows: logits_from_hidden(runner.kernel_split, runner.params[0], h, rows))
    every = np.asarray(head(hidden, jnp.asarray([4], jnp.int32)))
    two = np.asarray(head(hidden, jnp.asarray([2], jnp.int32)))
    np.testing.assert_array_equal(two[:2], every[:2])
    assert not two[2:].any() and np.abs(every[2:]).max() > 0


@pytest.mark.parametrize("width", [576, 9, 1])
def test_norm_sums_each_row_alike_at_every_batch_size(width):
    """XLA CPU sums a row over its last axis in another order below 8 rows than from 8 (an ulp apart on the
    default model's width), which moved a sequence's greedy tokens with its batch; fixed_order_sum adds in one
    order whatever the rows."""
    rng = np.random.default_rng(width)
    x = (rng.standard_normal((16, width)) * 3).astype(np.float32)
    total = jax.jit(lambda x: fixed_order_sum(x * x))
    everything = np.asarray(total(x))
    for rows in (1, 2, 3, 4, 8):
        np.testing.assert_array_equal(np.asarray(total(x[:rows])), everything[:rows])
    np.testing.assert_allclose(everything[:, 0], (x.astype(np.float64) ** 2).sum(-1), rtol=1e-5)
