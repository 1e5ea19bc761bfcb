"""Hand-written CPU kernels (AVX2 + FMA) as XLA FFI calls, for what a CPU step is made of and the sampler's
passes over the vocabulary.

- Projections with bfloat16 weights at small batch: XLA CPU streams those weights at about a quarter of the
  machine's memory bandwidth; `kernel_matmul` reads them once, in memory order, widening bf16 to f32 in
  registers. `matmul` is the pure-JAX reference and fallback, `project` picks between them.
- Attention over the paged KV cache (float32, bfloat16 or float8; decode steps and prefill chunks): XLA's path
  copies every chunk of gathered pages (gather, head-major transpose, mask); `ragged_paged_attention` walks the
  pages in place with an online softmax (cpu_attention.cc; on AVX-512 CPUs cpu_attention_avx512.cc for float32
  and bfloat16 pages, with its products in AMX tiles over bfloat16 ones where the CPU has them,
  cpu_attention_amx.cc). pallas_kernels/reference.py is its oracle.
- The elementwise work between a layer's projections (cpu_glue.cc): RMSNorm with the residual add before it,
  and RoPE with the KV write, one threaded pass each where XLA CPU ran several single-threaded ones.
- The sampler's passes over the vocabulary (cpu_sampling.cc): the top_k / top_p / min_p threshold per row
  (`sampling_threshold`), a token's logprob with its rank and the most likely alternatives
  (`token_logprobs`), and a row's log-normalizer with its greedy token (`log_normalizer`). XLA CPU's top_k is
  a sort, jaxserve/sampler.py's exact fallback bisects the vocabulary 32 times, and its logsumexp over
  [32, 49152] took 2.2 ms on one thread.

All run on XLA's own intra-op threads (cpu_parallel.h). The library is compiled on first use with the
system's C++ compiler into the user's cache (keyed by the source and the JAX headers), so an install needs no
build step; without AVX2, or with neither a built library nor a compiler, `available()` is False and callers
keep XLA's paths.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

HERE = pathlib.Path(__file__).parent
# One library; block_quant.py wraps block_quant*.cc
SOURCES = (HERE / "cpu_kernels.cc", HERE / "cpu_glue.cc", HERE / "cpu_attention.cc", HERE / "cpu_attention_avx512.cc",
           HERE / "cpu_attention_amx.cc",
           HERE / "cpu_sampling.cc", HERE / "block_quant.cc", HERE / "block_quant_avx512.cc",
           HERE / "block_quant_amx.cc", HERE / "int8_rows_amx.cc")
HEADERS = (HERE / "cpu_math.h", HERE / "cpu_parallel.h", HERE / "cpu_attention.h", HERE / "block_quant.h",
           HERE / "block_quant_bf16.h", HERE / "cpu_amx.h", HERE / "amx_stores.h")
# No contraction of a * b + c into one FMA where the source keeps them apart: the kernels match their
# references' roundings where they promise to.
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-std=c++17", "-fPIC")
TARGETS = {False: "jaxserve_bf16_matmul_kn", True: "jaxserve_bf16_matmul_nk"}
INT8_TARGET = "jaxserve_int8_matmul_kn"
ATTENTION_TARGET = "jaxserve_ragged_paged_attention"
WRITE_ROWS_TARGET = "jaxserve_write_rows"
ATTENTION_PAGE_DTYPES = ("float32", "bfloat16", "float8_e4m3fn", "float8_e5m2")
SAMPLING_TARGET = "jaxserve_sampling_threshold"
LOGPROBS_TARGET = "jaxserve_token_logprobs"
NORMALIZER_TARGET = "jaxserve_log_normalizer"
FIRST_MAX_TARGET = "jaxserve_first_max"
GLUE_TARGETS = ("jaxserve_add_rms_norm", "jaxserve_rope_write_kv")
BLOCK_QUANT_TARGETS = ("jaxserve_q4_matmul", "jaxserve_q8_matmul", "jaxserve_bf16_block_matmul",
                       "jaxserve_int8_rows_matmul")
# Rows (tokens) up to which the kernels beat XLA's dot on this class of machine, by weight layout
# (w_transposed); above them the per-row work outgrows the weight stream (docs/benchmarks.md).
MAX_KERNEL_ROWS = {False: 2, True: 4}


def _cache_dir() -> pathlib.Path:
    """Where built libraries live: $JAXSERVE_KERNEL_CACHE (an image can ship one built ahead), else the
    user's cache."""
    return pathlib.Path(os.environ.get("JAXSERVE_KERNEL_CACHE") or os.path.expanduser("~/.cache/jaxserve/kernels"))


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def _cpu_has_avx2() -> bool:
    return {"avx2", "fma", "f16c"} <= _cpu_flags()  # every AVX2 CPU has F16C (float8 pages widen through it)




def _library_path() -> pathlib.Path:
    """The library's path for this source and JAX build (the FFI headers it compiles against)."""
    code = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(code + " ".join(COMPILE_FLAGS).encode() + jax.ffi.include_dir().encode()
                            + jax.__version__.encode())
    return _cache_dir() / f"libjaxserve_cpu_kernels-{digest.hexdigest()[:16]}.so"


def _build(compiler: str) -> pathlib.Path:
    library = _library_path()
    library.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first starts never load a half-written library.
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        def compile_source(source: pathlib.Path) -> str:
            obj = str(pathlib.Path(tmp) / f"{source.stem}.o")
            subprocess.run([compiler, *COMPILE_FLAGS, "-isystem", jax.ffi.include_dir(), "-c", str(source), "-o", obj],
                           check=True, capture_output=True, text=True)
            return obj

        # The sources compile side by side (5-9 s each; one compiler call over all of them took ~45 s).
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as workers:
            objects = list(workers.map(compile_source, SOURCES))
        out = pathlib.Path(tmp) / library.name
        subprocess.run([compiler, "-shared", *objects, "-o", str(out)], check=True, capture_output=True, text=True)
        os.replace(out, library)
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels' library, loaded (built first, once per source version) and its FFI targets registered;
    None where they can't run here: no AVX2/FMA, no library and no C++ compiler to build it, a failed build,
    or JAXSERVE_CPU_KERNELS=0."""
    if os.environ.get("JAXSERVE_CPU_KERNELS", "1") == "0" or not _cpu_has_avx2():
        return None
    library = _library_path()
    if not library.exists():
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        if not compiler:
            logger.info("CPU kernels off: no C++ compiler to build them")
            return None
        try:
            library = _build(compiler)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            logger.warning("CPU kernels off: building them failed: %s", detail.strip()[-2000:])
            return None
    try:
        handle = ctypes.cdll.LoadLibrary(str(library))
        names = (*TARGETS.values(), INT8_TARGET, ATTENTION_TARGET, WRITE_ROWS_TARGET, SAMPLING_TARGET,
                 LOGPROBS_TARGET, NORMALIZER_TARGET, FIRST_MAX_TARGET, *BLOCK_QUANT_TARGETS, *GLUE_TARGETS)
        targets = {name: getattr(handle, name) for name in names}
        handle.jaxserve_has_bf16_dots.restype = ctypes.c_int
        handle.jaxserve_has_avx512_attention.restype = ctypes.c_int
        handle.jaxserve_has_amx_int8.restype = ctypes.c_int
    except (OSError, AttributeError) as err:  # a stale or foreign file under the expected name
        logger.warning("CPU kernels off: loading %s failed: %s", library, err)
        return None
    for name, symbol in targets.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return handle


def available() -> bool:
    """Whether the kernels run here (see _library)."""
    return _library() is not None


def has_fast_bf16_dots() -> bool:
    """Whether the kernels multiply bfloat16 in hardware here (AVX512-BF16: Zen 4, Sapphire Rapids and later,
    unless JAXSERVE_CPU_AVX512=0), where XLA's bfloat16 GEMM also runs at about twice its float32 one; on
    AVX2-only CPUs it runs slower than float32. Asked of the library, so Python and the kernels agree."""
    handle = _library()
    return handle is not None and handle.jaxserve_has_bf16_dots() == 1


def has_amx_tiles() -> bool:
    """Whether the bfloat16 block steps run in AMX tiles here (Intel Sapphire Rapids and later, with the OS's
    grant, unless JAXSERVE_CPU_AMX=0 or JAXSERVE_CPU_AVX512=0)."""
    return has_fast_bf16_dots() and _library().jaxserve_has_amx() == 1


def has_amx_int8_tiles() -> bool:
    """Whether int8 projections (pallas_kernels/int8_rows) run here: AMX with int8 tiles, under the same switches
    as has_amx_tiles."""
    return has_amx_tiles() and _library().jaxserve_has_amx_int8() == 1


def has_avx512_attention() -> bool:
    """Whether attention over float32 or bfloat16 pages (head_dim a multiple of 32) runs in the AVX-512 kernel
    here (cpu_attention_avx512.cc; unless JAXSERVE_CPU_AVX512=0), not the AVX2 one."""
    handle = _library()
    return handle is not None and handle.jaxserve_has_avx512_attention() == 1


def attention_in_tiles() -> bool:
    """Whether ragged_paged_attention multiplies in AMX tiles by default here over bfloat16 pages: the CPU has
    them (has_amx_tiles) and JAXSERVE_CPU_AMX_ATTENTION is not 0."""
    return has_amx_tiles() and os.environ.get("JAXSERVE_CPU_AMX_ATTENTION", "1") != "0"


def kernel_matmul(x: jax.Array, w: jax.Array, w_transposed: bool = False) -> jax.Array:
    """x[M, K] . w[K, N] (or . w[N, K]^T when `w_transposed`) -> float32 [M, N]; x and w bfloat16."""
    n = w.shape[0] if w_transposed else w.shape[1]
    call = jax.ffi.ffi_call(TARGETS[w_transposed], jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x, w)


def matmul(x: jax.Array, w: jax.Array, w_transposed: bool = False) -> jax.Array:
    """The reference: the same product as one XLA dot, in the weights' dtype with float32 accumulation."""
    contract = (((1,), (1,)), ((), ())) if w_transposed else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(x.astype(w.dtype), w, contract, preferred_element_type=jnp.float32)


def project(x: jax.Array, w: jax.Array, w_transposed: bool = False, kernel: bool = False) -> jax.Array:
    """x . w in float32, through the kernel when allowed (`kernel`: the caller runs on one CPU device with
    whole, unsliced weights) and the shapes suit it; decided at trace time."""
    if (kernel and x.ndim == 2 and x.shape[0] <= MAX_KERNEL_ROWS[w_transposed] and w.dtype == jnp.bfloat16
            and available()):
        return kernel_matmul(x.astype(w.dtype), w, w_transposed)
    return matmul(x, w, w_transposed)


def quantize_int8(w):
    """w[K, N] -> (int8 q[K, N], float32 scale[N]) with w ~= q * scale and power-of-two scales, so that every
    q * scale is exactly a bfloat16 value (|q| <= 127 fits bf16's significand): a bf16 copy of the rounded
    weights gives XLA's paths the very numbers the int8 kernel multiplies by. numpy or jax arrays."""
    xp = np if isinstance(w, np.ndarray) else jnp
    amax = xp.max(xp.abs(w.astype(xp.float32)), axis=0)
    scale = xp.exp2(xp.ceil(xp.log2(xp.where(amax > 0, amax, 1.0) / 127.0))).astype(xp.float32)
    q = xp.clip(xp.rint(w.astype(xp.float32) / scale), -127, 127).astype(xp.int8)
    return q, scale


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x[M, K] . (q[K, N] * scale[N]) -> float32 [M, N]; x bfloat16, through the kernel."""
    call = jax.ffi.ffi_call(INT8_TARGET, jax.ShapeDtypeStruct((x.shape[0], q.shape[1]), jnp.float32))
    return call(x.astype(jnp.bfloat16), q, scale)


def int8_project(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x . (q * scale) in float32: the kernel at small batch, else XLA on the dequantized (exactly bf16) weights."""
    if x.ndim == 2 and x.shape[0] <= MAX_KERNEL_ROWS[False] and available():
        return int8_matmul(x, q, scale)
    return matmul(x, (q.astype(jnp.float32) * scale).astype(jnp.bfloat16))


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           tiles: bool | None = None) -> jax.Array:
    """The FFI attention kernel: float32 q [T, H, D] against pages [P, page_size, Hkv, D] of one of
    ATTENTION_PAGE_DTYPES, with pallas_kernels/reference.py's semantics (ragged query lengths, causal, GQA,
    window, soft cap). `tiles`: over bfloat16 pages on CPUs with AMX (has_amx_tiles), the AVX-512 kernel's two
    products in AMX tiles, its queries and softmax weights rounded to bfloat16 for them (cpu_attention_amx.cc);
    by default where attention_in_tiles() (read at trace time)."""
    if tiles is None:
        tiles = attention_in_tiles()
    call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=np.float32(sm_scale),
                sliding_window=np.int64(sliding_window or 0), soft_cap=np.float32(soft_cap or 0.0),
                tiles=np.int64(bool(tiles)))


def write_rows(pages, rows, slots) -> jax.Array:
    """pages [P, page_size, Hkv, D] with rows [T, Hkv, D] (of the pages' dtype) written at flat slots [T], in
    place where `pages` is donated. For float8 caches: XLA CPU scatters float8 by widening the whole cache."""
    call = jax.ffi.ffi_call(WRITE_ROWS_TARGET, jax.ShapeDtypeStruct(pages.shape, pages.dtype),
                            input_output_aliases={0: 0})
    return call(pages, rows.astype(pages.dtype), slots.astype(jnp.int32))


def add_rms_norm(x, delta, weight, eps: float, rows):
    """(x + delta, models/llama.RMSNorm of it) for float32 x and delta [T, H], one pass on the intra-op threads
    (cpu_glue.cc): each row as the XLA path computes it, but for an exact 1 / sqrt (XLA's rsqrt is an estimate
    refined, an ulp off at times). Rows from rows[0] on (i32[1]) come back zero."""
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.ffi.ffi_call(GLUE_TARGETS[0], (out, out))(x, delta, weight.astype(jnp.float32),
                                                         jnp.asarray(rows, jnp.int32).reshape(1), eps=np.float32(eps))


def rope_write_kv(qkv, cos, sin, slot_mapping, k_pages, v_pages, rows, num_heads: int):
    """From float32 qkv [T, (Hq + 2 Hkv) * D]: q rotated [T, Hq, D] (rotate-half RoPE with cos / sin [T, D / 2]),
    and the pages [P, page_size, Hkv, D] (float32 or bfloat16) with k rotated and v written at slot_mapping [T],
    in place where they are donated (cpu_glue.cc). Rows from rows[0] on write nothing and come back zero."""
    t, d = qkv.shape[0], k_pages.shape[-1]
    out = (jax.ShapeDtypeStruct((t, num_heads, d), jnp.float32), jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
           jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype))
    call = jax.ffi.ffi_call(GLUE_TARGETS[1], out, input_output_aliases={4: 1, 5: 2})
    return call(qkv, cos, sin, slot_mapping.astype(jnp.int32), k_pages, v_pages,
                jnp.asarray(rows, jnp.int32).reshape(1))


def glue_fits(k_pages) -> bool:
    """Whether rope_write_kv takes these pages (float32 or bfloat16)."""
    return jnp.dtype(k_pages.dtype).name in ("float32", "bfloat16")


def sampling_threshold(scaled, top_k, top_p, min_p, live_rows) -> tuple[jax.Array, jax.Array]:
    """(threshold, row max) per row of `scaled` f32[S, V] for top_k i32[S] (0 = off), top_p f32[S] (1 = off)
    and min_p f32[S] (0 = off): the tokens with scaled >= threshold survive all three, as the sampler's
    `filter_threshold` defines them (cpu_sampling.cc). Rows from live_rows on come back (-inf, 0)."""
    rows = scaled.shape[0]
    out = (jax.ShapeDtypeStruct((rows,), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.float32))
    return jax.ffi.ffi_call(SAMPLING_TARGET, out)(
        scaled.astype(jnp.float32), top_k.astype(jnp.int32), top_p.astype(jnp.float32), min_p.astype(jnp.float32),
        _live_rows(live_rows, rows))


def _live_rows(live_rows, rows: int) -> jax.Array:
    """The sampling kernels' live-row count operand, i32[1] (all `rows` when None)."""
    return jnp.full((1,), rows, jnp.int32) if live_rows is None else jnp.asarray(live_rows, jnp.int32).reshape(1)


def token_logprobs(logits, token_ids, num_logprobs: int, live_rows=None):
    """Per row of `logits` f32[S, V]: (token_ids' logprob f32[S], its 1-based rank i32[S], the num_logprobs most
    likely tokens i32[S, K] and their logprobs f32[S, K]), as the sampler's `token_logprobs` defines them
    (cpu_sampling.cc). Rows from live_rows on come back zero."""
    rows = logits.shape[0]
    out = (jax.ShapeDtypeStruct((rows,), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.int32),
           jax.ShapeDtypeStruct((rows, num_logprobs), jnp.int32),
           jax.ShapeDtypeStruct((rows, num_logprobs), jnp.float32))
    return jax.ffi.ffi_call(LOGPROBS_TARGET, out)(logits.astype(jnp.float32), token_ids.astype(jnp.int32),
                                                  _live_rows(live_rows, rows))


def log_normalizer(logits, live_rows=None) -> tuple[jax.Array, jax.Array]:
    """Per row of `logits` f32[S, V]: (log(sum(exp(logits))) f32[S], the first index of the maximum i32[S]), as
    jax.nn.logsumexp and sampler.greedy_tokens (cpu_sampling.cc). Rows from live_rows on come back zero."""
    rows = logits.shape[0]
    out = (jax.ShapeDtypeStruct((rows,), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.int32))
    return jax.ffi.ffi_call(NORMALIZER_TARGET, out)(logits.astype(jnp.float32), _live_rows(live_rows, rows))


def first_max(logits, live_rows=None) -> jax.Array:
    """log_normalizer's greedy tokens alone (i32[S]), without its pass of exponentials."""
    rows = logits.shape[0]
    return jax.ffi.ffi_call(FIRST_MAX_TARGET, jax.ShapeDtypeStruct((rows,), jnp.int32))(
        logits.astype(jnp.float32), _live_rows(live_rows, rows))


def attention_fits(q, k_pages) -> bool:
    """Shapes and dtypes the attention kernel takes (float32 queries, pages of ATTENTION_PAGE_DTYPES, head_dim
    a multiple of 8, at most 256)."""
    head_dim = q.shape[-1]
    return (q.dtype == jnp.float32 and jnp.dtype(k_pages.dtype).name in ATTENTION_PAGE_DTYPES and head_dim % 8 == 0
            and head_dim <= 256)
