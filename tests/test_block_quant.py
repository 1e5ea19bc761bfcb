"""GGUF weights kept in their blocks (pallas_kernels/block_quant), and bfloat16 checkpoints in the same tiles:
the kernels against the pure-JAX reference, the packing against gguf's own dequantizer, loading, and
whole-engine agreement with dequantized weights and across batches."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
import test_weights
from test_weights import NH, NKV, write_tiny_gguf

from random_checkpoint import saved_default_tokenizer, write_random_llama

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
        if fmt == "bf16_blocks":
            return block_quant.tile(block_quant.pack_bf16(rng.standard_normal((n, k)).astype(np.float32) * 0.05))
        if fmt == "q4":
            return block_quant.tile({"qweight": rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8),
                                     "scales": scales, "mins": rng.uniform(-0.1, 0.0, (n, blocks)).astype(np.float32)})
        return block_quant.tile({"qweight": rng.integers(-127, 128, (n, blocks, 32), dtype=np.int8), "scales": scales})
    if layers is None:
        return one()
    stacked = [one() for _ in range(layers)]
    return {name: np.stack([w[name] for w in stacked]) for name in stacked[0]}


def weights_args(w):
    return w["qweight"], w.get("scales"), w.get("mins")


FORMATS = ["q4", "q8", "bf16_blocks"]


@pytest.mark.parametrize("fmt", FORMATS)
# Rows on both sides of the kernel's two loops (up to 8 rows: blocks multiplied as they are unpacked; more:
# panels), with an odd tile count (a last panel of two outputs).
@pytest.mark.parametrize("m,n,k", [(1, 64, 576), (3, 130, 1536), (8, 34, 64), (9, 34, 576), (14, 34, 576),
                                   (70, 18, 96)])
def test_kernel_matches_the_reference(fmt, m, n, k):
    rng = np.random.default_rng(m * n + k)
    w = random_blocks(rng, fmt, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = np.asarray(jax.jit(block_quant.matmul)(x, *weights_args(w)))
    want = np.asarray(block_quant.reference_matmul(x, *weights_args(w)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # Rows past `rows` (a step's padding) are not computed and come out zero; the others are unchanged.
    live = max(m - 2, 0)
    partial = np.asarray(block_quant.matmul(x, *weights_args(w), rows=jnp.asarray([live], jnp.int32)))
    np.testing.assert_array_equal(partial[:live], got[:live])
    assert not partial[live:].any()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bf16", [False, True])
def test_a_rows_sums_do_not_depend_on_the_rows_beside_it(fmt, bf16):
    """Every row count takes the same sums per row, bit for bit: alone, in a few rows (blocks multiplied as
    unpacked) or many (panels, rows in threes), padded or not. This is what keeps a sequence's greedy tokens
    and logprobs the same whatever it is batched with (bf16 where the CPU has AVX512-BF16, else float32). On
    AMX CPUs the bf16 rows also cross the tile paths: one token group of 1-16 (streamed, narrow tiles), two
    (17-32: a panel, the second group's tiles narrow), more (panels, pairs of groups and a last odd one)."""
    rng = np.random.default_rng(21)
    w = random_blocks(rng, fmt, 2 * 4 * 5 + 2, 160)  # 21 tiles: panels of four outputs and a last one of two
    x = rng.standard_normal((70, 160)).astype(np.float32)
    call = jax.jit(lambda x, q, s, mn: block_quant.matmul(x, q, s, mn, bf16=bf16))
    every = np.asarray(call(x, *weights_args(w)))
    for m in (1, 2, 3, 4, 5, 7, 8, 9, 10, 13, 16, 17, 29, 32, 33, 40):
        np.testing.assert_array_equal(np.asarray(call(x[:m], *weights_args(w))), every[:m], err_msg=f"{m} rows")
    for i in (0, 17, 39, 69):
        np.testing.assert_array_equal(np.asarray(call(x[i:i + 1], *weights_args(w))), every[i:i + 1])
    padded = np.asarray(block_quant.matmul(x, *weights_args(w), rows=jnp.asarray([5], jnp.int32), bf16=bf16))
    np.testing.assert_array_equal(padded[:5], every[:5])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("half", [48, 34])  # 48: AMX CPUs gate in the tiles' store; 34: after the whole product
def test_gated_projection_is_silu_of_the_first_half_times_the_second(fmt, bf16, half):
    """A fused gate/up projection straight into the MLP's activation: silu(x . gate) * (x . up) from the same
    sums as the ungated call, a row's outputs the same alone or batched, padding rows zero."""
    rng = np.random.default_rng(half)
    w = random_blocks(rng, fmt, 2 * half, 160)
    x = rng.standard_normal((70, 160)).astype(np.float32) * 4
    call = jax.jit(lambda x, q, s, mn, gated: block_quant.matmul(x, q, s, mn, bf16=bf16, gated=gated),
                   static_argnames="gated")
    whole = np.asarray(call(x, *weights_args(w), gated=False)).astype(np.float64)
    gate, up = whole[:, :half], whole[:, half:]
    want = gate / (1 + np.exp(-gate)) * up
    every = np.asarray(call(x, *weights_args(w), gated=True))
    assert every.shape == (70, half)
    np.testing.assert_allclose(every, want, rtol=2e-6, atol=1e-6 * np.abs(want).max())
    for m in (1, 5, 16, 17, 32, 33, 40):
        np.testing.assert_array_equal(np.asarray(call(x[:m], *weights_args(w), gated=True)), every[:m])
    padded = np.asarray(block_quant.matmul(x, *weights_args(w), rows=jnp.asarray([5], jnp.int32), bf16=bf16,
                                           gated=True))
    np.testing.assert_array_equal(padded[:5], every[:5])
    assert not padded[5:].any()


@pytest.mark.skipif(not cpu_kernels.has_amx_tiles(), reason="paired activations are the AMX tiles' path")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 5, 16, 17, 33, 70])
def test_gated_activations_pass_to_down_as_tiles_with_the_same_sums(fmt, m):
    """gate/up with paired_out then down taking those pairs gives down's outputs bit for bit as the float32
    activations would (rows on both sides of the stream and panel paths, a partial last token group), and
    padding rows stay zero."""
    rng = np.random.default_rng(m)
    gate_up, down = random_blocks(rng, fmt, 2 * 96, 160), random_blocks(rng, fmt, 48, 96)
    x = rng.standard_normal((m, 160)).astype(np.float32) * 4
    assert block_quant.amx_fits(96)

    @jax.jit
    def both(x, rows):
        act = block_quant.matmul(x, *weights_args(gate_up), rows=rows, bf16=True, gated=True)
        pairs = block_quant.matmul(x, *weights_args(gate_up), rows=rows, bf16=True, gated=True, paired_out=True)
        return (block_quant.matmul(act, *weights_args(down), rows=rows, bf16=True),
                block_quant.matmul(pairs, *weights_args(down), rows=rows, bf16=True, num_rows=x.shape[0]), pairs)

    for live in sorted({m, max(1, m - 3)}):
        want, got, pairs = map(np.asarray, both(x, jnp.asarray([live], jnp.int32)))
        assert pairs.dtype == np.uint32 and pairs.shape == (-(-m // 16), 96 // 32, 16, 16)
        np.testing.assert_array_equal(got, want)
        assert got[:live].any() and not got[live:].any()
        # token j's pair r of block b: its activations 32b + 2r (low half) and 32b + 2r + 1, as bfloat16
        act = np.asarray(jax.jit(lambda x: block_quant.matmul(
            x, *weights_args(gate_up), bf16=True, gated=True))(x)).astype(jnp.bfloat16).view(np.uint16)
        low = (pairs & 0xFFFF).astype(np.uint16).transpose(0, 3, 1, 2).reshape(-1, 96 // 2)[:live]
        high = (pairs >> 16).astype(np.uint16).transpose(0, 3, 1, 2).reshape(-1, 96 // 2)[:live]
        np.testing.assert_array_equal(low, act[:live, 0::2])
        np.testing.assert_array_equal(high, act[:live, 1::2])


@pytest.mark.skipif(not cpu_kernels.has_amx_tiles(), reason="argmax is the AMX tiles' path")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 7, 16, 33, 70])
def test_argmax_is_the_first_largest_output_of_the_product(fmt, m):
    """argmax=True gives each row's first largest output of the product it does not write, across the tasks'
    panel ranges (1280 outputs: 40 panels over 8 tasks), with ties (three equal outputs far apart), padding rows
    zero and a row with a NaN at the last index, as the sampler's greedy token of the logits."""
    rng = np.random.default_rng(m)
    w = random_blocks(rng, fmt, 1280, 96)
    tile = 10 // block_quant.TILE  # outputs 10 and 11 eight times larger, then copied to 1000 and 1270
    if "scales" in w:
        for name in ("scales", "mins"):
            if name in w:
                w[name][tile] *= 8
    else:
        w["qweight"][tile] = (w["qweight"][tile].view(jnp.bfloat16).astype(np.float32) * 8).astype(
            jnp.bfloat16).view(w["qweight"].dtype)
    for name, a in w.items():
        a[1000 // block_quant.TILE] = a[tile]
        a[1270 // block_quant.TILE] = a[tile]
    dense = np.asarray(block_quant.dequantize(*weights_args(w)), np.float32)
    x = rng.standard_normal((m, 96)).astype(np.float32)
    x[::3] = dense[10] * 50  # rows whose largest outputs are the three equal ones
    if m > 5:
        x[5, 7] = np.nan
    call = jax.jit(lambda x, rows, argmax: block_quant.matmul(x, *weights_args(w), rows=rows, bf16=True,
                                                              argmax=argmax), static_argnames="argmax")
    for live in sorted({m, max(1, m - 2)}):
        rows = jnp.asarray([live], jnp.int32)
        logits = np.asarray(call(x, rows, argmax=False))
        got = np.asarray(call(x, rows, argmax=True))
        want = np.where(np.isnan(logits).any(axis=1), 1279, np.argmax(np.nan_to_num(logits, nan=-np.inf), axis=1))
        assert got.dtype == np.int32 and got.shape == (m,)
        np.testing.assert_array_equal(got[:live], want[:live])
        assert not got[live:].any()
        assert (got[:live:3] == 10).all()  # the first of the tied outputs
        log_total, first = cpu_kernels.log_normalizer(jnp.asarray(logits), rows)
        np.testing.assert_array_equal(got[:live], np.asarray(first)[:live])


@pytest.mark.parametrize("fmt", FORMATS)
def test_stacked_weights_are_read_at_the_layer_index(fmt):
    rng = np.random.default_rng(7)
    w = random_blocks(rng, fmt, 32, 64, layers=3)
    for rows in (5, 12):  # both loops
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        step = jax.jit(lambda x, layer, q, s, mn: block_quant.matmul(x, q, s, mn, layer))
        for layer in range(3):
            got = step(x, jnp.int32(layer), *weights_args(w))
            want = block_quant.reference_matmul(x, *weights_args({k: v[layer] for k, v in w.items()}))
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("m", [1, 2, 7, 13, 17, 31, 70])
def test_bf16_multiplies_the_rounded_values_where_the_cpu_has_it(fmt, m):
    """bf16=True on CPUs with AVX512-BF16: x and the weights rounded to bfloat16 and summed in float32. On
    other CPUs the attribute changes nothing: float32, exact."""
    rng = np.random.default_rng(m)
    w = random_blocks(rng, fmt, 42, 128)
    x = rng.standard_normal((m, 128)).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, q, s, mn: block_quant.matmul(x, q, s, mn, bf16=True))(x, *weights_args(w)))
    bf16 = cpu_kernels.has_fast_bf16_dots()
    want = np.asarray(block_quant.reference_matmul(x, *weights_args(w), bf16=bf16))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    exact = x @ block_quant.dequantize(*weights_args(w)).T
    error = np.abs(got - exact).max() / np.abs(exact).max()
    assert 1e-4 < error < 2e-2 if bf16 else error < 1e-5


# Run in a fresh process under an environment that turns a path off (the library reads it once).
OTHER_PATH_CHECK = """
import numpy as np, jax
from jaxserve.pallas_kernels import block_quant, cpu_kernels
assert cpu_kernels.available()
rng = np.random.default_rng(3)
for fmt in ("q4", "q8"):
    nb = 5
    scales = rng.uniform(0.001, 0.02, (42, nb)).astype(np.float32)
    if fmt == "q4":
        w = block_quant.tile({"qweight": rng.integers(0, 256, (42, nb, 16), dtype=np.uint8), "scales": scales,
                              "mins": rng.uniform(-0.1, 0.0, (42, nb)).astype(np.float32)})
    else:
        w = block_quant.tile({"qweight": rng.integers(-127, 128, (42, nb, 32), dtype=np.int8), "scales": scales})
    args = (w["qweight"], w["scales"], w.get("mins"))
    x = rng.standard_normal((70, 160)).astype(np.float32)
    call = jax.jit(lambda x, q, s, mn: block_quant.matmul(x, q, s, mn, bf16=True))
    every = np.asarray(call(x, *args))
    for m in (1, 5, 8, 9, 17, 33):
        np.testing.assert_array_equal(np.asarray(call(x[:m], *args)), every[:m])
    want = np.asarray(block_quant.reference_matmul(x, *args, bf16=cpu_kernels.has_fast_bf16_dots()))
    np.testing.assert_allclose(every, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
print("paths", cpu_kernels.has_fast_bf16_dots(), cpu_kernels.has_amx_tiles())
"""


@pytest.mark.parametrize("switch", ["JAXSERVE_CPU_AMX", "JAXSERVE_CPU_AVX512"])
def test_the_paths_a_faster_cpu_skips_still_hold(switch):
    """On a CPU with AMX (or AVX512-BF16) the tests above run the fastest path; the slower ones, which other
    CPUs take, are checked here with the faster one switched off: reference sums and row invariance."""
    faster = cpu_kernels.has_amx_tiles() if switch == "JAXSERVE_CPU_AMX" else cpu_kernels.has_fast_bf16_dots()
    if not faster:
        pytest.skip(f"this CPU takes the path {switch}=0 keeps anyway")
    env = {**os.environ, switch: "0"}
    done = subprocess.run([sys.executable, "-c", OTHER_PATH_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    bf16, amx = done.stdout.split()[-2:]
    assert amx == "False" and bf16 == str(switch == "JAXSERVE_CPU_AMX")


def test_multiply_dtype_follows_the_weights_dtype_and_the_cpu():
    assert block_quant.multiply_dtype(jnp.float32) == jnp.float32
    expected = jnp.bfloat16 if cpu_kernels.has_fast_bf16_dots() else jnp.float32
    assert block_quant.multiply_dtype(jnp.bfloat16) == expected


def test_bf16_blocks_hold_the_rounded_weights_and_look_rows_up():
    import ml_dtypes
    rng = np.random.default_rng(5)
    w = rng.standard_normal((10, 96)).astype(np.float32)
    q = block_quant.tile(block_quant.pack_bf16(w))["qweight"]
    assert q.dtype == np.uint16 and q.shape == (5, 3 * 2 * 32)
    rounded = w.astype(ml_dtypes.bfloat16).astype(np.float32)  # to nearest even, as XLA's convert
    np.testing.assert_array_equal(block_quant.dequantize(q), rounded)
    np.testing.assert_array_equal(np.asarray(block_quant.dequantize(jnp.asarray(q))), rounded)
    ids = jnp.asarray([9, 0, 4, 4])
    np.testing.assert_array_equal(np.asarray(block_quant.lookup_rows(jnp.asarray(q), None, None, ids)),
                                  rounded[np.asarray(ids)])


def test_bf16_block_formats_leave_modules_that_do_not_tile_dense():
    from jaxserve.config import ModelConfig
    from jaxserve.engine_setup import bf16_block_formats
    # hidden 64 tiles; an odd vocabulary (embedding rows) and an intermediate of 100 values (down's input) do not
    cfg = ModelConfig("llama", 1001, 64, 100, 2, 4, 2, 16, tie_word_embeddings=False)
    assert dict(bf16_block_formats(cfg)) == {m: "bf16_blocks" for m in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj")}
    cfg = ModelConfig("llama", 1000, 64, 128, 2, 4, 2, 16)
    assert {"down_proj", "embed_tokens"} <= dict(bf16_block_formats(cfg)).keys()


@pytest.mark.skipif(cpu_kernels.has_fast_bf16_dots() and not cpu_kernels.has_amx_tiles(),
                    reason="XLA's bfloat16 dot keeps these weights here")
@pytest.mark.parametrize("qwen2", [False, True])  # Qwen2: q/k/v biases and an untied head
def test_bf16_checkpoint_rows_are_the_same_alone_and_batched(tmp_path, qwen2):
    """A bfloat16 (dtype auto) safetensors model on one CPU: every projection and the tied head go through
    the block loops as bfloat16 tiles (in float32, or in AMX tiles where the CPU has them), so a sequence's
    tokens and logprobs are bit for bit the same alone and batched with others; and they stay close to float32
    XLA. (Head size 64: at 16 a logprob still moves
    by ~1e-6 with the batch, from some op of the jitted step other than the projections; the attention kernel
    and RoPE alone are exact there.)"""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file
    model = write_random_llama(tmp_path / "model", saved_default_tokenizer(tmp_path), hidden=128, heads=2,
                               kv_heads=1, intermediate=256, qkv_bias=qwen2, tied=not qwen2)
    # weights that bfloat16 holds exactly: float32 XLA then multiplies the very same numbers
    tensors = load_file(model / "model.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in tensors.items()},
              model / "model.safetensors")
    kw = dict(model=str(model), checkpoint_cache_dir=None, precompile=False, max_model_len=128,
              max_num_seqs=4, block_size=4, kv_cache_dtype="float32", kv_cache_memory=2**22)
    llm = LLM(max_num_batched_tokens=64, **kw)
    formats = dict(llm.engine.runner.config.block_formats)
    assert set(formats.values()) == {"bf16_blocks"} and {"q_proj", "down_proj", "embed_tokens"} <= formats.keys()
    assert ("lm_head" in formats) == qwen2
    rng = np.random.default_rng(11)
    prompts = [rng.integers(100, 40000, size=int(rng.integers(2, 30))).tolist() for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    together = llm.generate(prompts, params)
    alone = [llm.generate([p], params)[0] for p in prompts]
    for a, b in zip(alone, together):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert {t: lp.logprob for t, lp in pa.items()} == {t: lp.logprob for t, lp in pb.items()}
    reference = LLM(dtype="float32", max_num_batched_tokens=64, **kw)
    assert reference.engine.runner.config.block_formats == ()
    dense = reference.generate(prompts, SamplingParams(temperature=0, max_tokens=1, logprobs=3))
    # float32 loops: the same products, summed in another order; AMX tiles: the activations rounded to bfloat16
    # as well (a random model's logprobs then move by a few hundredths)
    tolerance = 0.15 if cpu_kernels.has_amx_tiles() else 1e-3
    for got, want in zip(together, dense):
        for token, lp in want.outputs[0].logprobs[0].items():
            assert abs(got.outputs[0].logprobs[0][token].logprob - lp.logprob) < tolerance


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


def random_q4_k(rng, rows: int, supers: int) -> np.ndarray:
    """Random Q4_K super-blocks [rows, supers * 144] (gguf cannot quantize K-quants) with small finite d, dmin."""
    raw = rng.integers(0, 256, size=(rows, supers, 144), dtype=np.uint8)
    for first in (0, 2):
        half = rng.uniform(1e-4, 2e-3, (rows, supers, 1)).astype(np.float16)
        raw[:, :, first:first + 2] = half.view(np.uint8)
    return raw.reshape(rows, -1)


def test_q4_k_super_blocks_are_q4_blocks_exactly():
    rng = np.random.default_rng(7)
    raw = random_q4_k(rng, 6, 3)  # 6 rows of 768 values
    packed = block_quant.tile(block_quant.pack_gguf(raw, "Q4_K"))
    want = dequantize(raw, QT.Q4_K).reshape(6, 768)
    np.testing.assert_array_equal(block_quant.dequantize(*weights_args(packed)), want)
    ids = jnp.asarray([5, 0, 3])
    np.testing.assert_array_equal(np.asarray(block_quant.lookup_rows(*weights_args(packed), ids)),
                                  want[np.asarray(ids)])
    x = rng.standard_normal((3, 768)).astype(np.float32)
    got = np.asarray(block_quant.matmul(jnp.asarray(x), *map(jnp.asarray, weights_args(packed))))
    np.testing.assert_allclose(got, x @ want.T, rtol=1e-5, atol=1e-5 * np.abs(x @ want.T).max())


def write_q4_k_gguf(path, rng, mixed_down: bool = False):
    """A 2-layer Llama GGUF (hidden 256, 4 heads of 64, 2 KV heads) whose projections are Q4_K; with
    `mixed_down`, layer 1's down_proj is Q6_K (as llama.cpp's Q4_K_M mixes), norms and embedding float32."""
    import gguf

    hidden, inter, layers, vocab = 256, 256, 2, 64
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", layers), ("embedding_length", hidden), ("feed_forward_length", inter),
                       ("attention.head_count", 4), ("attention.head_count_kv", 2), ("context_length", 256)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, hidden)).astype(np.float32))
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    shapes = {"attn_q": 256, "attn_k": 128, "attn_v": 128, "attn_output": hidden, "ffn_gate": inter,
              "ffn_up": inter, "ffn_down": hidden}
    for layer in range(layers):
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{layer}.{name}.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        for name, rows in shapes.items():
            if mixed_down and layer == 1 and name == "ffn_down":
                raw, qtype = rng.integers(0, 256, (rows, 210), dtype=np.uint8), QT.Q6_K
                raw[:, 208:210] = rng.uniform(1e-4, 1e-3, (rows, 1)).astype(np.float16).view(np.uint8)
            else:
                raw, qtype = random_q4_k(rng, rows, 1), QT.Q4_K
            w.add_tensor(f"blk.{layer}.{name}.weight", raw, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.mark.parametrize("mixed_down", [False, True])
def test_q4_k_model_runs_in_blocks_like_its_dequantized_weights(tmp_path, mixed_down):
    write_q4_k_gguf(tmp_path / "k.gguf", np.random.default_rng(11), mixed_down)
    formats = block_formats(read_gguf_header(str(tmp_path / "k.gguf")))
    want = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"} | (set() if mixed_down else {"down_proj"})
    assert set(formats) == want and set(formats.values()) == {"q4"}  # a module of mixed types dequantizes
    kw = dict(model=str(tmp_path / "k.gguf"), tokenizer=default_gguf_path(), checkpoint_cache_dir=None,
              precompile=False, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
              kv_cache_dtype="float32", dtype="float32")
    blocks, dense = LLM(quantization="gguf", **kw), LLM(quantization="none", **kw)
    assert dict(blocks.engine.runner.config.block_formats)["gate_proj"] == "q4"
    assert {"qkv_proj", "gate_up_proj"} <= {str(path[-2]) for path in blocks.engine.runner.split.layer_paths}
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 60, size=int(rng.integers(2, 14))).tolist() for _ in range(3)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    for got, ref in zip(blocks.generate(prompts, params), dense.generate(prompts, params)):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
        for token, lp in ref.outputs[0].logprobs[0].items():  # the same weights, summed in another order
            assert abs(got.outputs[0].logprobs[0][token].logprob - lp.logprob) < 1e-4


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


# qwen3 (q/k norms) with float32 activations: its random norm weights make bfloat16's rounding the larger part
@pytest.mark.parametrize("arch, fused, dtype", [("llama", False, "auto"), ("llama", True, "auto"),
                                                ("qwen3", True, "float32")])
def test_block_engine_agrees_with_dequantized_weights_and_across_batches(tmp_path, monkeypatch, arch, fused,
                                                                         dtype):
    if fused:  # q/k/v and gate/up all 4-bit (Q4_0 and Q4_1 mixed): each group becomes one block weight
        monkeypatch.setitem(test_weights.QUANT_FOR, "v_proj", QT.Q4_0)
        monkeypatch.setitem(test_weights.QUANT_FOR, "gate_proj", QT.Q4_1)
    write_tiny_gguf(tmp_path / "tiny.gguf", arch=arch)
    # Steps of at most 11 tokens, through both of the kernel's loops, whose rows come out the same at any
    # batch size. A float32 KV cache on both sides: the weights' arithmetic is under test.
    kw = dict(model=str(tmp_path / "tiny.gguf"), tokenizer=default_gguf_path(), checkpoint_cache_dir=None,
              precompile=False, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=11, block_size=4,
              kv_cache_dtype="float32")
    blocks = LLM(dtype=dtype, quantization="gguf", **kw)  # the file's blocks, not int8 rows (AMX machines)
    assert dict(blocks.engine.runner.config.block_formats)["q_proj"] == "q4"
    assert blocks.engine.model_config.qk_norm == (arch == "qwen3")
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
        # The top-3 logprobs of the first step, up to dtype auto's bfloat16 activations between the layers.
        for token, lp in first.items():
            assert abs(got.outputs[0].logprobs[0][token].logprob - lp.logprob) < (0.03 if dtype == "auto" else 1e-4)


def test_quantization_choices(random_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="quantization gguf needs a .gguf model"):
        LLM(model=str(random_llama_dir), quantization="gguf", precompile=False, max_model_len=64)
    with pytest.raises(ValueError, match="quantization must be one of gguf, int8, w8a8, none"):
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


def test_the_start_up_log_names_the_multiply_path():
    from jaxserve.engine_setup import describe_projection_kernels
    formats = (("down_proj", "q4"), ("embed_tokens", "q8"))
    assert describe_projection_kernels(formats, False, False, "float32") == (
        "blocks (down_proj q4, embed_tokens q8; 4/8-bit ones multiplied in float32), other weights off")
    path = ("bfloat16 in AMX tiles" if cpu_kernels.has_amx_tiles() else "bfloat16 (AVX512-BF16)"
            if cpu_kernels.has_fast_bf16_dots() else "float32")
    assert f"multiplied in {path})" in describe_projection_kernels(formats, True, False, "bfloat16")
    assert describe_projection_kernels((), True, True, "bfloat16") == "int8"
    assert describe_projection_kernels((("down_proj", "int8_rows"), ("q_proj", "int8_rows")), False, False) == (
        "int8 rows (down_proj, q_proj; int8 activations, AMX int8 tiles), other weights off")
    mixed = describe_projection_kernels((("down_proj", "q4"), ("q_proj", "int8_rows")), False, False)
    assert mixed.startswith("int8 rows (q_proj; ") and "blocks (down_proj q4; 4/8-bit ones multiplied in" in mixed
