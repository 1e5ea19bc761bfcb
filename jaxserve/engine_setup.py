"""Start-up: resolve the model, load (or restore) weights, size the KV cache, build the runner."""
from __future__ import annotations

import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.buckets import BucketSet
from jaxserve.config import KV_CACHE_DTYPES, EngineConfig, ModelConfig
from jaxserve.executable_cache import ExecutableCache
from jaxserve.model_runner import ModelRunner, RunnerConfig, allocate_kv_cache
from jaxserve.models.checkpoint_cache import prune_lru
from jaxserve.models.sharding import plan_tensor_parallel, replica_devices, tensor_parallel_mesh
from jaxserve.multihost import agree_on_minimum, check_mesh_spans_hosts, connect_hosts, join_hosts
from jaxserve.pallas_kernels import block_quant, cpu_kernels, int8_rows

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 2 * 1024**3
DEFAULT_CPU_MAX_MODEL_LEN = 8192


class CompilationCounter:
    """Counts XLA backend compilations (JAX reports each through its monitoring events)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event == self.EVENT:
            with self._lock:
                self.count += 1


@dataclass
class LoadedModel:
    model_config: ModelConfig
    tokenizer: object
    runner: ModelRunner
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    model_name: str
    compilation_counter: CompilationCounter
    config: EngineConfig  # with the platform's defaults filled in
    checkpoint_bytes_read: int | None = None  # sharded loads: bytes this host read from the checkpoint
    default_sampling: dict = field(default_factory=dict)  # see resolve_default_sampling


def budget_bytes(gib: float) -> int | None:
    """A cache budget in GiB as bytes; a negative budget is none (None)."""
    return None if gib < 0 else int(gib * 2**30)


def enable_compilation_cache(cache_dir: str | None, max_bytes: int | None = None) -> str | None:
    """Points XLA's persistent compilation cache at `cache_dir` (default ~/.cache/jaxserve/xla), first pruned
    to its budget (oldest files out); a budget of 0 keeps no cache (returns None). JAX's own eviction
    (jax_compilation_cache_max_size) scans the whole directory at every write: 0.7 s each with 14k files."""
    if max_bytes == 0:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "xla")
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if max_bytes is not None:
        prune_lru(cache_dir, max_bytes, r".+-(?:cache|atime)", files=True)  # JAX's file names
    return cache_dir


def resolve_kv_cache_dtype(kv_cache_dtype: str, dtype: str, activation_dtype: str, on_cpu: bool) -> str:
    """The KV cache's dtype (a JAX dtype name). `auto`: on the CPU bfloat16 with 16-bit weights (a decode
    step's attention is mostly reading the cache, and the CPU kernel widens bfloat16 as it reads) and float32
    with float32 weights; elsewhere the activations' dtype."""
    if kv_cache_dtype != "auto":
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be auto, {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        return KV_CACHE_DTYPES[kv_cache_dtype]
    if on_cpu:
        return "float32" if dtype == "float32" else "bfloat16"
    return activation_dtype


def resolve_dtype(dtype: str, declared: str | None = None) -> str:
    """The weights' dtype. `auto`: bfloat16 on the CPU; elsewhere the checkpoint's half type, else bfloat16."""
    if dtype != "auto":
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        return dtype
    # On the CPU the activations stay float32 (see load_engine_model), and bfloat16 weights with
    # float32-accumulating dots measured faster than float32 weights: 1.5-2x per decode step at small batch,
    # a little for prefill (docs/benchmarks.md). XLA CPU has no fast float16 dot.
    if jax.default_backend() != "cpu" and declared in ("bfloat16", "float16"):
        return declared
    return "bfloat16"


def resolve_attention_backend(backend: str, num_devices: int = 1) -> str:
    """auto: the Pallas kernels on accelerators; on the CPU the hand-written kernel for decode steps when it
    builds here and the engine has one device (XLA cannot partition it), else the XLA path."""
    if backend == "auto":
        if jax.default_backend() != "cpu":
            return "pallas"
        return "cpu" if num_devices == 1 and cpu_kernels.available() else "xla"
    if backend not in ("xla", "pallas", "cpu"):
        raise ValueError(f"attention_backend must be auto, pallas, xla or cpu, got {backend!r}")
    if backend == "cpu" and (num_devices > 1 or not cpu_kernels.available()):
        raise ValueError("attention_backend cpu needs one CPU device with AVX2 and a C++ compiler to build "
                         "its kernel")
    return backend


QUANTIZATIONS = ("gguf", "int8", "w8a8", "none")
BLOCK_LAYOUT_VERSION = 2  # bump when the packed layout or the block modules change (2: fused q/k/v and gate/up)


def resolve_block_formats(quantization: str | None, source, kernels_here: bool, cfg: ModelConfig,
                          dtype: str) -> tuple[tuple[str, str], ...]:
    """(module, format) pairs whose weights go through the block kernels (pallas_kernels/block_quant): a GGUF
    file's blocks, or a bfloat16 checkpoint's weights in the same tiles (bf16_block_formats).

    `quantization`: None (auto: for a .gguf model where the kernels run, "w8a8" where the CPU has AMX int8
    tiles and the model runs in bfloat16, else "gguf"), "gguf" (keep the file's Q4_0 / Q4_1 / Q4_K / Q8_0 blocks, as llama.cpp and vLLM's GGUF
    support run them), "w8a8" (int8 rows with int8 activations in AMX tiles: int8_rows_formats), "none"
    (dequantize to the compute dtype), "int8" (see load_engine_model). `kernels_here`: one CPU device with the
    CPU kernels."""
    from jaxserve.models.gguf_reader import block_formats, read_gguf_header

    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or unset, got {quantization!r}")
    if quantization == "gguf" and not source.is_gguf:
        raise ValueError("--quantization gguf needs a .gguf model")
    if quantization == "gguf" and not kernels_here:
        raise ValueError("--quantization gguf needs the CPU kernels: one CPU device, AVX2 and a C++ compiler "
                         "(elsewhere GGUF weights are dequantized: --quantization none)")
    if (quantization is None and source.is_gguf and kernels_here and int8_rows.available()
            and block_quant.multiply_dtype(dtype) == jnp.bfloat16):
        # A GGUF's weights are already quantized; int8 activations are what llama.cpp multiplies them with too
        # (perplexity +0.4% on the default model; one-token steps ~35% faster: docs/benchmarks.md round 32).
        # An explicit --dtype float32 keeps the blocks' float32 loops.
        quantization = "w8a8"
    if quantization == "w8a8":
        if not (kernels_here and int8_rows.available()):
            raise ValueError("--quantization w8a8 needs one CPU device with AMX int8 tiles (Intel Sapphire Rapids "
                             "or later) and the CPU kernels")
        return int8_rows_formats(cfg, block_formats(read_gguf_header(source.path)) if source.is_gguf else {})
    if not kernels_here or quantization == "int8":
        return ()
    if not source.is_gguf:
        # Where the CPU multiplies bfloat16 in hardware, XLA's bfloat16 dot stays (twice the float32 rate), unless
        # it has AMX: the blocks then go through its tiles as they are (one-row steps 35-37 -> 17-21 ms).
        bf16 = jnp.dtype(dtype) == jnp.bfloat16 and (not cpu_kernels.has_fast_bf16_dots()
                                                     or cpu_kernels.has_amx_tiles())
        return bf16_block_formats(cfg) if bf16 else ()
    if quantization == "none":
        return ()
    return tuple(sorted(block_formats(read_gguf_header(source.path)).items()))


def _weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The [out, in] shape of each block-capable module's weights."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h),
              "up_proj": (i, h), "down_proj": (h, i), "embed_tokens": (v, h)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (v, h)
    return shapes


def bf16_block_formats(cfg: ModelConfig) -> tuple[tuple[str, str], ...]:
    """(module, "bf16_blocks") for a bfloat16 checkpoint's projections and embedding on one CPU device: their
    weights go into block_quant's tiles and through its float32 loops, which give a row the same sums at
    every batch size (XLA's dot does not: its blocking changes with the row count). Modules whose shapes do
    not tile (input not a multiple of 32 values, an odd number of outputs) stay dense."""
    from jaxserve.pallas_kernels import block_quant

    return tuple(sorted((module, "bf16_blocks") for module, (rows, cols) in _weight_shapes(cfg).items()
                        if rows % block_quant.TILE == 0 and cols % block_quant.BLOCK == 0))


def int8_rows_formats(cfg: ModelConfig, fallback: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """(module, "int8_rows") for every projection and the embedding whose shape fits int8 rows
    (pallas_kernels/int8_rows: outputs a multiple of 16, inputs of 64); the others keep `fallback`'s format
    (a GGUF file's blocks) or stay dense. A fused projection's parts (q/k/v, gate/up) all fit or none does."""
    from jaxserve.models.llama import FUSED_PROJECTIONS

    shapes = _weight_shapes(cfg)
    fits = {module: int8_rows.fits(*shape) for module, shape in shapes.items()}
    for parts in FUSED_PROJECTIONS.values():
        if not all(fits[part] for part in parts):
            fits.update(dict.fromkeys(parts, False))
    formats = {module: "int8_rows" if fits[module] else fallback.get(module) for module in shapes}
    return tuple(sorted((module, fmt) for module, fmt in formats.items() if fmt))


def weight_bytes(flat: dict) -> int:
    """The bytes a flat parameter dict (numpy arrays or lazy checkpoint tensors) takes on its devices."""
    return sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in flat.values())


def kv_budget_bytes(config: EngineConfig, device=None, device_weight_bytes: int = 0) -> int:
    """`device`: one of this engine's own (a host's local one on multi-host, its group's with data parallel).
    On an accelerator the budget is its share of memory (gpu_memory_utilization) less what is in use and what
    the weights, not placed yet, will take there (`device_weight_bytes`)."""
    if config.kv_cache_memory is not None:
        return int(config.kv_cache_memory)
    if jax.default_backend() == "cpu":
        return DEFAULT_CPU_KV_BYTES
    stats = (device or jax.local_devices()[0]).memory_stats() or {}
    limit, in_use = stats.get("bytes_limit", 0), stats.get("bytes_in_use", 0)
    return max(int(limit * config.gpu_memory_utilization) - in_use - device_weight_bytes, 0)


def resolve_default_sampling(generation_config: str, source, override: str | None = None) -> dict:
    """Request defaults from a generation_config.json (as vLLM's --generation-config): "auto" reads the model
    folder's (a .gguf file has none), "vllm" none, anything else is a folder that must hold one; `override`
    (--override-generation-config, a JSON object of generation-config fields) is merged over them."""
    from jaxserve.models.weights import generation_defaults, generation_defaults_from

    if generation_config == "vllm" or (generation_config == "auto" and source.is_gguf):
        defaults = {}
    elif generation_config == "auto":
        defaults = generation_defaults(source.path)
    elif not os.path.isfile(os.path.join(generation_config, "generation_config.json")):
        raise ValueError(f"--generation-config {generation_config!r}: no generation_config.json in that folder "
                         "(or use auto or vllm)")
    else:
        defaults = generation_defaults(generation_config)
    if override:
        try:
            fields = json.loads(override)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--override-generation-config is not JSON: {exc}")
        if not isinstance(fields, dict):
            raise ValueError("--override-generation-config must be a JSON object, e.g. '{\"temperature\": 0.5}'")
        defaults = {**defaults, **generation_defaults_from(fields)}
    return defaults


def load_engine_model(config: EngineConfig) -> LoadedModel:
    from jaxserve.models.checkpoint_cache import load_or_build, source_identity
    from jaxserve.models.llama import flat_params_from_hf, round_projections_to_int8
    from jaxserve.models.lazy_tensors import CheckpointFiles
    from jaxserve.models.weights import (checkpoint_dtype, iter_hf_tensors, lazy_hf_tensors, load_model_config,
                                         load_tokenizer, resolve_model_source)

    multihost = join_hosts(config)  # jax.distributed first: it must precede any use of the backend
    config = config.with_platform_defaults(jax.default_backend())
    if min(config.max_num_seqs, config.max_num_batched_tokens) < 1:
        raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
    if config.scheduling_policy not in ("fcfs", "priority"):
        raise ValueError(f"scheduling_policy must be fcfs or priority, got {config.scheduling_policy!r}")
    if config.max_num_batched_tokens < config.max_num_seqs:
        raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be at least "
                         f"max_num_seqs ({config.max_num_seqs})")
    # This engine's devices: a data-parallel replica owns its own group of tensor_parallel_size devices.
    devices = replica_devices(jax.devices(), config.tensor_parallel_size, config.data_parallel_size,
                              config.data_parallel_rank)
    mesh = tensor_parallel_mesh(config.tensor_parallel_size, devices)  # raises when JAX sees too few devices
    if multihost:
        check_mesh_spans_hosts(mesh, config.num_hosts)
    compiled_budget = budget_bytes(config.compilation_cache_max_gb)
    cache_dir = enable_compilation_cache(config.compilation_cache_dir, compiled_budget)
    counter = CompilationCounter()
    source = resolve_model_source(config.model)
    model_config = load_model_config(source)
    # The tokenizer (Python, one core) builds while the weights restore and the KV cache is zeroed (native code,
    # the other core): ~1 s of a warm start.
    tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="jaxserve-tokenizer")
    tokenizer_loaded = tokenizer_thread.submit(load_tokenizer, source, config.tokenizer)
    tokenizer_thread.shutdown(wait=False)
    dtype = resolve_dtype(config.dtype, checkpoint_dtype(source))
    on_cpu = jax.default_backend() == "cpu"
    one_cpu_with_kernels = on_cpu and mesh.size == 1 and not multihost and cpu_kernels.available()
    formats = resolve_block_formats(config.quantization, source, one_cpu_with_kernels, model_config, dtype)
    # Block layouts carry their own version: a cache entry's arrays are used as they are.
    blocks = {"blocks": formats, "block_layout": BLOCK_LAYOUT_VERSION} if formats else {}
    key = {"source": source_identity(source), "dtype": dtype, "format": 1, **blocks}
    # int8 rows are packed from the float weights (models/llama.flat_params_from_hf), the rest kept in blocks
    keep_blocks = frozenset(module for module, fmt in formats if fmt != "int8_rows")
    # Sharded: each device's slice is read from the safetensors files when it is placed, so no host holds a
    # whole split weight and each host reads only its own devices' slices.
    checkpoint_files = CheckpointFiles() if not source.is_gguf and (mesh.size > 1 or multihost) else None

    def load_weights() -> dict:
        if checkpoint_files is not None:
            return flat_params_from_hf(model_config, lazy_hf_tensors(source, checkpoint_files), dtype)
        build = lambda: flat_params_from_hf(model_config, dict(iter_hf_tensors(source, keep_blocks)), dtype, formats)
        if multihost:
            # GGUF tensors dequantize whole: every host converts for itself. orbax's save synchronizes all
            # processes, so hosts whose caches differ (one restores, one builds) would wait on each other forever.
            return build()
        return load_or_build(config.checkpoint_cache_dir, key, build, budget_bytes(config.checkpoint_cache_max_gb))

    # On the CPU the KV cache's size is known before the weights, and zeroing its pages (native code, bound by
    # page faults, ~1 s for 2 GiB) overlaps the restore. An accelerator's budget is what its weights leave free.
    kv_ahead = on_cpu and not multihost
    flat = None if kv_ahead else load_weights()
    max_model_len = config.max_model_len or min(model_config.max_position_embeddings, DEFAULT_CPU_MAX_MODEL_LEN
                                                if jax.default_backend() == "cpu" else 1 << 30)
    if max_model_len > model_config.max_position_embeddings:
        logger.warning("max_model_len %d exceeds the model's max_position_embeddings %d", max_model_len,
                       model_config.max_position_embeddings)
    page_size = config.block_size
    pages_per_seq = -(-max_model_len // page_size)
    # Hidden states stay float32 on the CPU whatever the weights' dtype: XLA CPU has no fast bfloat16
    # elementwise path; its bfloat16 dots accumulate into float32 (models/llama.Linear). The KV cache's dtype is
    # resolve_kv_cache_dtype's.
    activation_dtype = "float32" if on_cpu else dtype
    kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype, activation_dtype, on_cpu)
    per_page = ModelRunner.kv_bytes_per_page(model_config, page_size, kv_cache_dtype)
    # Split by KV head, each device holds 1/tp of every page; replicated, each holds all of it. An
    # accelerator's budget is its own memory; CPU devices (virtual ones included) all share the host's RAM.
    kv_split = mesh.size if plan_tensor_parallel(model_config, mesh.size).kv_heads else 1
    device_bytes_per_page = per_page // kv_split
    budget_bytes_per_page = device_bytes_per_page * (mesh.size if jax.default_backend() == "cpu" else 1)
    # (TP shards nearly every weight: a device holds about 1/size of them; the rest is in the headroom)
    device_weights = 0 if flat is None else weight_bytes(flat) // mesh.size
    budget = kv_budget_bytes(config, mesh.local_devices[0], device_weights)
    if on_cpu:  # data-parallel replicas on the CPU share the host's RAM, as TP's virtual devices do
        budget //= config.data_parallel_size
    num_pages = budget // budget_bytes_per_page
    if multihost:  # one global KV array: every host sizes it alike, to the host with the least free memory
        num_pages = agree_on_minimum(num_pages)
    if num_pages < pages_per_seq + 1:
        raise ValueError(
            f"The KV cache budget ({budget} bytes = {num_pages} pages of {page_size} tokens) "
            f"cannot hold one sequence of max_model_len={max_model_len}; raise --kv-cache-memory or lower "
            "--max-model-len.")
    buckets = BucketSet.for_limits(config.max_num_seqs, config.max_num_batched_tokens,
                                   config.speculative_max_rows if config.num_speculative_tokens else 0)
    attention = resolve_attention_backend(config.attention_backend, mesh.size)
    if attention == "pallas" and mesh.size > 1 and kv_split == 1:
        # The kernel runs per device on whole KV heads (pallas_kernels/attention.py); replicated KV heads
        # would need each device to pick its query heads' KV heads out of all of them.
        logger.warning("tensor parallel %d: %d KV heads do not split, so attention runs on the XLA path, "
                       "not the Pallas kernel", mesh.size, model_config.num_kv_heads)
        attention = "xla"
    if on_cpu and jnp.dtype(kv_cache_dtype).itemsize == 1 and attention != "cpu":
        # write_kv's row writer runs with the CPU attention kernel; XLA CPU's own float8 scatter widens the cache
        logger.warning("a float8 KV cache on the CPU without the attention kernel (attention %s): every KV write "
                       "widens the whole cache; expect slow steps", attention)
    cpu_kernel = on_cpu and mesh.size == 1 and jnp.dtype(dtype) == jnp.bfloat16 and cpu_kernels.available()
    int8_weights = config.quantization == "int8"
    if int8_weights and not cpu_kernel:
        raise ValueError("--quantization int8 needs the CPU kernels: one CPU device, bfloat16 weights (dtype "
                         "auto or bfloat16), AVX2 and a C++ compiler")
    runner_config = RunnerConfig(dtype, page_size, int(num_pages), pages_per_seq, buckets, attention,
                                 activation_dtype, unroll_decode_max_seqs=2 if on_cpu and not formats else 0,
                                 cpu_kernel=cpu_kernel, int8_weights=int8_weights, block_formats=formats,
                                 kv_cache_dtype=kv_cache_dtype, cpu_sampling=one_cpu_with_kernels)
    kv_cache = None
    if kv_ahead:
        kv_thread = ThreadPoolExecutor(1, thread_name_prefix="jaxserve-kv-cache")
        kv_cache = kv_thread.submit(allocate_kv_cache, model_config, runner_config, mesh)
        kv_thread.shutdown(wait=False)
        flat = load_weights()
    if int8_weights:
        flat = round_projections_to_int8(flat)
    # Serialized executables skip tracing on a warm start; one device only (sharded executables are keyed to
    # their device assignment, and a multi-host start must compile in lockstep), and only the first: one
    # loads bound to the device it was compiled for, so other data-parallel replicas compile their own.
    executables = None
    if cache_dir and mesh.size == 1 and jax.process_count() == 1 and mesh.devices.flat[0] == jax.devices()[0]:
        executables = ExecutableCache(os.path.join(cache_dir, "jaxserve-executables"),
                                      {"model": repr(model_config), "runner": repr(runner_config)},
                                      compiled_budget)
    runner = ModelRunner(model_config, runner_config, flat, mesh, executables,
                         kv_cache.result() if kv_cache is not None else None)
    if checkpoint_files is not None:
        logger.info("read %.1f MiB of the %.1f MiB checkpoint for this host's shards",
                    checkpoint_files.bytes_read / 2**20, checkpoint_files.total_bytes() / 2**20)
    if multihost:  # host 0: a runner that sends each call to the followers; others: a Follower to run()
        runner = connect_hosts(runner, config)
    tokenizer = tokenizer_loaded.result()
    eos = set(model_config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(tokenizer.eos_token_id)
    logger.info("KV cache: %d pages of %d tokens (%.2f GiB per device, %s), max_model_len %d, dtype %s, "
                "tensor parallel %d, attention %s, CPU projection kernels %s", num_pages, page_size,
                num_pages * device_bytes_per_page / 1024**3, kv_cache_dtype, max_model_len, dtype, mesh.size,
                describe_attention(attention, kv_cache_dtype, model_config.head_dim),
                describe_projection_kernels(formats, cpu_kernel, int8_weights, dtype))
    default_sampling = resolve_default_sampling(config.generation_config, source, config.override_generation_config)
    if default_sampling:
        logger.info("Sampling defaults from the model's generation_config.json for what requests leave unset: %s "
                    "(--generation-config vllm keeps OpenAI's)", default_sampling)
    return LoadedModel(model_config, tokenizer, runner, max_model_len, tuple(sorted(eos)), source.name, counter,
                       config, checkpoint_files.bytes_read if checkpoint_files else None, default_sampling)


def describe_attention(attention: str, kv_cache_dtype: str, head_dim: int) -> str:
    """For the start-up log: the attention path, and on the CPU which kernel (AVX-512, with its products in AMX
    tiles, or AVX2) runs it."""
    if attention != "cpu":
        return attention
    wide = (cpu_kernels.has_avx512_attention() and head_dim % 32 == 0
            and jnp.dtype(kv_cache_dtype) in (jnp.float32, jnp.bfloat16))
    if wide and jnp.dtype(kv_cache_dtype) == jnp.bfloat16 and cpu_kernels.attention_in_tiles():
        return "cpu (AVX-512, AMX tiles)"
    return f"cpu ({'AVX-512' if wide else 'AVX2'})"


def describe_projection_kernels(formats, cpu_kernel: bool, int8_weights: bool, dtype: str = "float32") -> str:
    """For the start-up log: which kernel multiplies which weights, and for blocks in what (block_quant's plan:
    float32, AVX512-BF16 loops or AMX tiles)."""
    dense = ("int8" if int8_weights else "bf16") if cpu_kernel else "off"
    if not formats:
        return dense
    rows = [module for module, fmt in formats if fmt == "int8_rows"]
    described = [f"int8 rows ({', '.join(rows)}; int8 activations, AMX int8 tiles)"] if rows else []
    if len(rows) < len(formats):
        blocks = ", ".join(f"{module} {fmt}" for module, fmt in formats if fmt != "int8_rows")
        if block_quant.multiply_dtype(dtype) != jnp.bfloat16:
            multiply = "float32"
        else:
            multiply = "bfloat16 in AMX tiles" if cpu_kernels.has_amx_tiles() else "bfloat16 (AVX512-BF16)"
        described.append(f"blocks ({blocks}; 4/8-bit ones multiplied in {multiply})")
    return f"{', '.join(described)}, other weights {dense}"
