"""bfloat16-weight projections for small batches on the CPU: a hand-written AVX2 kernel as an XLA FFI call.

XLA CPU runs a decode step's bf16 x bf16 -> f32 dots at about a quarter of this machine's memory bandwidth
(docs/benchmarks.md). `cpu_matmul.cc` streams the weights once per call, widening bf16 to f32 in registers,
on XLA's own intra-op threads. The library is compiled on first use with the system's C++ compiler into
the user's cache (keyed by the source and the JAX headers), so an install needs no build step; without
AVX2, or with neither a built library nor a compiler, `available()` is False and callers keep XLA's dot.

`matmul(x, w, w_transposed)` is the pure-JAX reference and fallback; `kernel_matmul` the FFI call.
"""
from __future__ import annotations

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

logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("cpu_matmul.cc")
TARGETS = {False: "jaxserve_bf16_matmul_kn", True: "jaxserve_bf16_matmul_nk"}
# Rows (tokens) up to which the kernels beat XLA's dot on this class of machine, by weight layout
# (w_transposed); above them the per-row work outgrows the weight stream (docs/benchmarks.md).
MAX_KERNEL_ROWS = {False: 2, True: 8}


def _cache_dir() -> pathlib.Path:
    """Where built libraries live: $JAXSERVE_KERNEL_CACHE (an image can ship one built ahead), else the
    user's cache."""
    return pathlib.Path(os.environ.get("JAXSERVE_KERNEL_CACHE") or os.path.expanduser("~/.cache/jaxserve/kernels"))


def _cpu_has_avx2() -> bool:
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma"))


def _library_path() -> pathlib.Path:
    """The library's path for this source and JAX build (the FFI headers it compiles against)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + jax.ffi.include_dir().encode() + jax.__version__.encode())
    return _cache_dir() / f"libjaxserve_cpu_matmul-{digest.hexdigest()[:16]}.so"


def _build(compiler: str) -> pathlib.Path:
    library = _library_path()
    library.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first starts never load a half-written library.
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        out = pathlib.Path(tmp) / library.name
        cmd = [compiler, "-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-isystem",
               jax.ffi.include_dir(), str(SOURCE), "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out, library)
    return library


@functools.cache
def available() -> bool:
    """Load (building it first, once per source version) and register the kernels; False where they can't
    run here: no AVX2/FMA, no library and no C++ compiler to build it, a failed build, or
    JAXSERVE_CPU_KERNELS=0."""
    if os.environ.get("JAXSERVE_CPU_KERNELS", "1") == "0" or not _cpu_has_avx2():
        return False
    library = _library_path()
    if not library.exists():
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        if not compiler:
            logger.info("CPU matmul kernel off: no C++ compiler to build it")
            return False
        try:
            library = _build(compiler)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            logger.warning("CPU matmul kernel off: building it failed: %s", detail.strip()[-2000:])
            return False
    handle = ctypes.cdll.LoadLibrary(str(library))
    for name in TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handle, name)), platform="cpu")
    return True


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
