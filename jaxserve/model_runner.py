"""Pads a scheduled step to its bucket and runs one jitted model step over the paged KV cache.

Host → device: one packed int32 buffer of step metadata per step. The model is a pure function of the
flattened parameter leaves (no Flax on the hot path); the KV cache is donated and updated in place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.buckets import BucketSet, StepShape
from jaxserve.config import ModelConfig
from jaxserve.executable_cache import ExecutableCache
from jaxserve.models.llama import (BLOCK_LEAVES, AttentionMetadata, abstract_split, greedy_tokens_from_hidden,
                                   logits_from_hidden, scanned_forward, scanned_params, unrolled_forward)
from jaxserve.models.sharding import (kv_cache_partition_spec, param_shardings, place_sharded,
                                      plan_tensor_parallel, tensor_parallel_mesh)
from jaxserve.pallas_kernels import cpu_kernels
from jaxserve.sampler import SamplerFlags, SamplerOutput, SamplingTensors, sample, token_logprobs
from jaxserve.sampling_metadata import placeholder_sampling_tensors
from jaxserve.scheduler import ScheduledSeq

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerConfig:
    dtype: str  # the weights': float32 | bfloat16 | float16
    page_size: int
    num_pages: int
    pages_per_seq: int  # page-table width = ceil(max_model_len / page_size)
    buckets: BucketSet
    attention_backend: str  # xla | cpu | pallas
    activation_dtype: str | None = None  # hidden states (and the KV cache unless kv_cache_dtype); None = dtype
    # Decode-only steps of at most this many sequences run the layers unrolled over per-layer weight arrays
    # (kept beside the stacked ones). On XLA CPU a 2-sequence step drops from 75 to 49 ms (no per-layer
    # weight-slice copies) and an 8-sequence engine step from 187 to 142 ms, but an unrolled step compiles ~4x
    # slower and takes ~1.1 s to load from the executable cache (vs 0.05 s). 0 = never.
    unroll_decode_max_seqs: int = 0
    # Unrolled steps and the LM head run small-batch bf16 projections through the hand-written CPU kernel
    # (pallas_kernels/cpu_kernels): one CPU device only, and only where the weights are whole arrays (a
    # scanned layer's weight slice would be copied out for the call).
    cpu_kernel: bool = False
    # With cpu_kernel: the unrolled steps' per-layer projection weights are int8 (rounded at load to per-column
    # power-of-two scales, so the stacked bf16 copy holds the very same values for the scanned steps).
    int8_weights: bool = False
    # (module, "q4" / "q8") for the modules whose weights stay in GGUF's blocks (pallas_kernels/block_quant):
    # their kernels run at every batch size, reading the layer-stacked weights in place.
    block_formats: tuple[tuple[str, str], ...] = ()
    kv_cache_dtype: str | None = None  # None = activation_dtype
    # The sampler's top_k / top_p / min_p cut-offs and logprobs through the CPU kernels (pallas_kernels/
    # cpu_sampling.cc, jaxserve/sampler.sample): one CPU device.
    cpu_sampling: bool = False


def _layout(shape: StepShape, pages_per_seq: int) -> dict[str, tuple[int, int]]:
    """Offsets of each field inside the packed int32 metadata buffer (static per bucket)."""
    t, s = shape.num_tokens, shape.num_seqs
    sizes = [("token_ids", t), ("token_src", t), ("positions", t), ("slot_mapping", t), ("kv_lens", s),
             ("cu_q_lens", s + 1), ("num_seqs", 1), ("logits_indices", s), ("page_indices", s * pages_per_seq)]
    layout, offset = {}, 0
    for name, size in sizes:
        layout[name] = (offset, size)
        offset += size
    return layout


def _renamed(fn, name: str):
    """`fn` under another __name__ (jax.jit names the compiled module after it)."""
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper


@dataclass
class StepInput:
    """Host-side view of one padded step."""

    shape: StepShape
    packed: np.ndarray  # int32, laid out by _layout
    num_seqs: int
    sample_rows: list[int]  # rows (sequence slots) whose logits are sampled
    reads_previous: bool = False  # some token comes from the previous step's sampled tokens (token_src)


def kv_cache_sharding(model_config: ModelConfig, mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, kv_cache_partition_spec(plan_tensor_parallel(model_config, mesh.size)))


def allocate_kv_cache(model_config: ModelConfig, runner_config: RunnerConfig,
                      mesh: jax.sharding.Mesh) -> tuple[jax.Array, jax.Array]:
    """The zeroed K and V pages, [num_layers * num_pages, page_size, num_kv_heads, head_dim] each."""
    rc = runner_config
    shape = (model_config.num_layers * rc.num_pages, rc.page_size, model_config.num_kv_heads, model_config.head_dim)
    dtype = rc.kv_cache_dtype or rc.activation_dtype or rc.dtype
    sharding = kv_cache_sharding(model_config, mesh)
    return jnp.zeros(shape, dtype, device=sharding), jnp.zeros(shape, dtype, device=sharding)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, runner_config: RunnerConfig, flat_params: dict[str, np.ndarray],
                 mesh: jax.sharding.Mesh | None = None, executable_cache: ExecutableCache | None = None,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None):
        """`kv_cache`: (K, V) as allocate_kv_cache makes them, when the caller allocated them ahead."""
        self.model_config = model_config
        self.config = runner_config
        self.dtype = jnp.dtype(runner_config.dtype)
        self.activation_dtype = jnp.dtype(runner_config.activation_dtype or runner_config.dtype)
        # Tensor parallelism: the mesh's size is the TP degree; parameters and the KV cache are placed with
        # NamedShardings (models/sharding.py) and XLA partitions the jitted step and inserts the collectives.
        self.mesh = mesh or tensor_parallel_mesh(1)
        self.tp_plan = plan_tensor_parallel(model_config, self.mesh.size)
        for reason in self.tp_plan.reasons:
            logger.warning("tensor parallel %d: %s", self.mesh.size, reason)
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        sharded_kernel = runner_config.attention_backend == "pallas" and self.mesh.size > 1
        formats = runner_config.block_formats
        self.split = abstract_split(model_config, self.dtype, runner_config.attention_backend, self.activation_dtype,
                                    self.mesh if sharded_kernel else None, block_formats=formats)
        uses_cpu_kernels = (runner_config.cpu_kernel or runner_config.attention_backend == "cpu" or formats
                            or runner_config.cpu_sampling)
        if uses_cpu_kernels and not cpu_kernels.available():  # also registers them before cached executables load
            raise RuntimeError("the runner config asks for the CPU kernels, which could not be built here")
        kernel_mode = "int8" if runner_config.int8_weights else "bf16"
        self.kernel_split = abstract_split(model_config, self.dtype, runner_config.attention_backend,
                                           self.activation_dtype, cpu_kernel=kernel_mode, block_formats=formats) \
            if runner_config.cpu_kernel else self.split
        outer, stacked = scanned_params(self.split, flat_params, model_config.num_layers)
        outer_shardings = param_shardings(self.mesh, self.tp_plan, self.split.outer_paths, stacked=False)
        layer_shardings = param_shardings(self.mesh, self.tp_plan, self.split.layer_paths, stacked=True)
        # (outer leaves, stacked layer leaves, per-layer leaves or [] when decode is not unrolled)
        self.params = (place_sharded(outer, outer_shardings), place_sharded(stacked, layer_shardings), [])
        if runner_config.unroll_decode_max_seqs:  # sliced on the devices: the checkpoint is not read twice
            one_layer = param_shardings(self.mesh, self.tp_plan, self.split.layer_paths, stacked=False)
            self.params[2].extend(self._per_layer_leaves(i, one_layer) for i in range(model_config.num_layers))
        self.kv_sharding = kv_cache_sharding(model_config, self.mesh)
        self.kv_cache = kv_cache if kv_cache is not None else allocate_kv_cache(model_config, runner_config, self.mesh)
        self.executable_cache = executable_cache
        self._step_fns: dict[StepShape, object] = {}  # lazily jitted, or compiled ahead by precompile()
        self._sample_fn = jax.jit(self._sample, static_argnames=("flags",))
        self._compiled_samplers: dict[tuple[SamplerFlags, int], object] = {}
        # The previous step's sampled tokens, padded to the widest sequence bucket (the step's input shape
        # does not depend on the previous step's bucket); zeros when no token comes from there.
        self.max_sample_rows = max(shape.num_seqs for shape in runner_config.buckets.all_shapes())
        self.no_previous_tokens = jax.device_put(np.zeros(self.max_sample_rows, np.int32), self.replicated)
        self.num_compiled_ahead = 0  # by the last precompile(); the rest came from the executable cache
        self._prompt_logprobs_fn = jax.jit(self._prompt_logprobs, static_argnames=("num_logprobs",))

    def _per_layer_leaves(self, layer: int, shardings) -> list:
        """Layer `layer`'s leaves for the unrolled steps, in kernel_split's order: slices of the stacked ones
        (placed with `shardings`), and with int8 weights each projection kernel as int8 plus its
        `weight_scale`. Block-quantized weights stay the stacked arrays (their kernels take the layer index)."""
        sliced = {path: a if path[-1] in BLOCK_LEAVES else jax.device_put(a[layer], s)
                  for path, a, s in zip(self.split.layer_paths, self.params[1], shardings)}
        quantized = {}  # module path -> (q, scale), one quantization per projection
        leaves = []
        for path in self.kernel_split.layer_paths:
            if self.config.int8_weights and path[-1] in ("kernel", "weight_scale"):
                module = path[:-1]
                if module not in quantized:
                    quantized[module] = cpu_kernels.quantize_int8(sliced[module + ("kernel",)])
                leaves.append(quantized[module][0 if path[-1] == "kernel" else 1])
            else:
                leaves.append(sliced[path])
        return leaves

    # ---- KV cache -------------------------------------------------------------------------------
    @staticmethod
    def kv_bytes_per_page(model_config: ModelConfig, page_size: int, dtype: str) -> int:
        """`dtype`: the KV cache's."""
        per_token = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim
        return per_token * page_size * jnp.dtype(dtype).itemsize

    # ---- jitted functions -----------------------------------------------------------------------
    def _build_step(self, shape: StepShape, name: str = "step"):
        layout = _layout(shape, self.config.pages_per_seq)
        pps, num_pages = self.config.pages_per_seq, self.config.num_pages
        unrolled = self._unrolled(shape)
        forward, split = (unrolled_forward, self.kernel_split) if unrolled else (scanned_forward, self.split)

        def step(outer, layers, kv_cache, packed, previous_tokens):
            field = lambda name: jax.lax.dynamic_slice_in_dim(packed, *layout[name])
            # A token still on the device (async scheduling) is the previous step's sampled token of row
            # token_src; the others came from the host.
            src = field("token_src")
            token_ids = jnp.where(src >= 0, previous_tokens[jnp.maximum(src, 0)], field("token_ids"))
            meta = AttentionMetadata(
                slot_mapping=field("slot_mapping"), kv_lens=field("kv_lens"),
                page_indices=field("page_indices").reshape(shape.num_seqs, pps),
                cu_q_lens=field("cu_q_lens"), num_seqs=field("num_seqs"))
            hidden, kv_cache = forward(split, outer, layers, token_ids, field("positions"),
                                       kv_cache, meta, num_pages)
            return hidden[field("logits_indices")], hidden, kv_cache

        # The cache comes back with the sharding it went in with, so donation reuses its buffers in place;
        # hidden states come back replicated for the sampler.
        kv_out = (self.kv_sharding, self.kv_sharding)
        step.__name__ = step.__qualname__ = name  # the compiled module's name
        return jax.jit(step, donate_argnums=(2,), out_shardings=(self.replicated, self.replicated, kv_out))

    def _unrolled(self, shape: StepShape) -> bool:
        return shape.decode_only and shape.num_seqs <= self.config.unroll_decode_max_seqs

    def step_params(self, shape: StepShape) -> tuple:
        """(outer leaves, layer leaves) the step function of `shape` takes."""
        outer, stacked, per_layer = self.params
        return outer, (per_layer if self._unrolled(shape) else stacked)

    def _sample(self, outer, last_hidden, tensors: SamplingTensors, flags: SamplerFlags):
        """(SamplerOutput, its token ids padded to max_sample_rows: the next step's previous_tokens). Plain
        greedy rows that need no logprob take their tokens from the LM head's kernel where it can give them
        (LlamaForCausalLM.greedy_tokens: the same tokens, no [S, V] logits written and read back)."""
        tokens = (greedy_tokens_from_hidden(self.kernel_split, outer, last_hidden, tensors.live_rows)
                  if flags.plain_greedy and self.config.cpu_sampling else None)
        if tokens is not None:
            out = SamplerOutput(tokens, jnp.zeros(tokens.shape, jnp.float32))
        else:
            logits = logits_from_hidden(self.kernel_split, outer, last_hidden, tensors.live_rows)
            out = sample(logits, tensors, flags, cpu_kernel=self.config.cpu_sampling)
        return out, jnp.pad(out.token_ids.astype(jnp.int32), (0, self.max_sample_rows - out.token_ids.shape[0]))

    def _prompt_logprobs(self, outer, hidden, target_ids, num_logprobs: int):
        """Log-probabilities of each next prompt token (and the top alternatives) for all T positions."""
        logits = logits_from_hidden(self.kernel_split, outer, hidden)
        out = token_logprobs(logits, target_ids, max(num_logprobs, 1), cpu_kernel=self.config.cpu_sampling)
        return out.logprob, out.rank, out.top_ids, out.top_logprobs

    def step_fn(self, shape: StepShape):
        fn = self._step_fns.get(shape)
        if fn is None:
            fn = self._step_fns[shape] = self._build_step(shape)
        return fn

    # ---- host side ------------------------------------------------------------------------------
    def prepare(self, scheduled: list[ScheduledSeq], previous_rows: dict[int, int] | None = None) -> StepInput:
        """`previous_rows`: seq_id -> that sequence's row in the step in flight, whose sampled token (pending
        on the device) this step reads where the sequence's tokens say PENDING_TOKEN."""
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        shape = self.config.buckets.bucket_for(num_tokens, len(scheduled))
        layout = _layout(shape, self.config.pages_per_seq)
        packed = np.zeros(sum(size for _, size in layout.values()), np.int32)
        view = {name: packed[o:o + n] for name, (o, n) in layout.items()}
        ps = self.config.page_size
        page_rows = view["page_indices"].reshape(shape.num_seqs, self.config.pages_per_seq)
        view["token_src"][:] = -1
        # Gathered as Python lists and written once per field: a decode row's few scalars cost less so than
        # as numpy slices (256 decode rows: 1.7 -> 0.45 ms on a 2-core CPU host).
        token_ids, positions, slots, kv_lens, cu_q_lens, last_rows = [], [], [], [], [], []
        sample_rows, pending = [], []
        cursor = 0
        previous_seq, previous_end = None, -1
        for row, item in enumerate(scheduled):
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens + item.draft_index
            pages = seq.pages
            if n == 1:
                token_ids.append(item.draft_token if item.draft_index else seq.token_slice(start, start + 1)[0])
                positions.append(start)
                slots.append(pages[start // ps] * ps + start % ps)
            else:
                token_ids.extend(seq.token_slice(start, start + n))
                span = range(start, start + n)
                positions.extend(span)
                slots.extend(pages[p // ps] * ps + p % ps for p in span)
            if seq.num_pending_tokens and start + n > seq.num_known_tokens:
                # only a decode step's single token can be pending (one step in flight, no drafts then)
                pending.append((cursor + n - 1, previous_rows[seq.seq_id]))
            cursor += n
            last_rows.append(cursor - 1)
            if seq is previous_seq and start == previous_end:
                # a draft row right after its sequence's previous row: the same attention query block (its
                # pages read once for both), each token still seeing positions up to its own
                kv_lens[-1] = start + n
                cu_q_lens[-1] = cursor
            else:
                page_rows[len(kv_lens), :len(pages)] = pages
                kv_lens.append(start + n)
                cu_q_lens.append(cursor)
            previous_seq, previous_end = seq, start + n
            if item.samples:
                sample_rows.append(row)
        rows, blocks = len(scheduled), len(kv_lens)
        view["token_ids"][:cursor] = token_ids
        view["positions"][:cursor] = positions
        view["slot_mapping"][:cursor] = slots
        view["kv_lens"][:blocks] = kv_lens
        view["cu_q_lens"][1:blocks + 1] = cu_q_lens
        view["cu_q_lens"][blocks + 1:] = cursor
        view["num_seqs"][0] = blocks
        view["logits_indices"][:rows] = last_rows
        for index, source_row in pending:
            view["token_src"][index] = source_row
        reads_previous = bool(pending)
        return StepInput(shape, packed, len(scheduled), sample_rows, reads_previous)

    def execute(self, step: StepInput, previous_tokens=None):
        """Dispatches the model step; returns device arrays (last-token hidden [S, H], all hidden [T, H]).
        `previous_tokens`: the step in flight's padded sampled tokens, for a step that reads them."""
        if step.reads_previous and previous_tokens is None:
            raise ValueError("the step reads tokens of a step in flight that were not given")
        fn = self.step_fn(step.shape)
        # One device: the call takes the host buffer itself (about 0.3 ms a step less than a device_put first,
        # measured on a 2-core CPU: ~4% of a one-sequence decode step). Several: device_put with the
        # replicated sharding (not jnp.asarray, which compiles a copy per buffer size on first use).
        packed = step.packed if self.mesh.size == 1 else jax.device_put(step.packed, self.replicated)
        previous = previous_tokens if step.reads_previous else self.no_previous_tokens
        last_hidden, hidden, self.kv_cache = fn(*self.step_params(step.shape), self.kv_cache, packed, previous)
        return last_hidden, hidden

    def sample(self, last_hidden, tensors: SamplingTensors, flags: SamplerFlags) -> tuple[SamplerOutput, jax.Array]:
        """Device arrays: the sampler's output and its token ids padded for the next step (`execute`)."""
        if self.config.cpu_sampling and flags.filter_window:  # the kernel needs no window: one variant for all
            flags = dataclasses.replace(flags, filter_window=0)
        compiled = self._compiled_samplers.get((flags, last_hidden.shape[0]))
        if compiled is not None:
            try:
                return compiled(self.params[0], last_hidden, tensors)
            except TypeError:  # tensors shaped unlike the warm-up placeholders: the jitted path handles any
                pass
        return self._sample_fn(self.params[0], last_hidden, tensors, flags=flags)

    def prompt_logprobs(self, hidden, target_ids: np.ndarray, num_logprobs: int):
        return self._prompt_logprobs_fn(self.params[0], hidden, jax.device_put(target_ids, self.replicated),
                                        num_logprobs=num_logprobs)

    def precompile(self, shapes: list[StepShape], sampler_flags: list[SamplerFlags], progress: bool = True) -> float:
        """Compile every bucket's step and the given sampler variants ahead of time (or load them from the
        executable cache); returns seconds spent."""
        from concurrent.futures import ThreadPoolExecutor, as_completed

        from tqdm import tqdm

        start = time.perf_counter()
        jobs = []  # (name, lower, store)
        for shape in shapes:
            name = f"step_{shape.num_tokens}x{shape.num_seqs}"
            packed = np.zeros(sum(size for _, size in _layout(shape, self.config.pages_per_seq).values()), np.int32)
            jobs.append((name, lambda shape=shape, packed=packed, name=name: self._build_step(
                shape, self._module_name(name)).lower(*self.step_params(shape), self.kv_cache, packed,
                                                      self.no_previous_tokens),
                         lambda fn, shape=shape: self._step_fns.__setitem__(shape, fn)))
        for num_seqs in sorted({shape.num_seqs for shape in shapes}):
            hidden = jax.ShapeDtypeStruct((num_seqs, self.model_config.hidden_size), self.activation_dtype,
                                          sharding=self.replicated)
            for flags in sampler_flags:
                name = f"sample_{num_seqs}_{hashlib.sha256(repr(flags).encode()).hexdigest()[:12]}"
                tensors = placeholder_sampling_tensors(flags, num_seqs, self.model_config.vocab_size)
                jobs.append((name, lambda hidden=hidden, tensors=tensors, flags=flags, name=name: jax.jit(
                    _renamed(self._sample, self._module_name(name)), static_argnames=("flags",)).lower(
                        self.params[0], hidden, tensors, flags=flags),
                             lambda fn, key=(flags, num_seqs): self._compiled_samplers.__setitem__(key, fn)))
        cached = [None] * len(jobs)
        if self.executable_cache:  # deserializing is mostly native code: threads overlap it
            with ThreadPoolExecutor(max_workers=2) as pool:
                cached = list(pool.map(self.executable_cache.load, [name for name, _, _ in jobs]))
        for (_, _, store), hit in zip(jobs, cached):
            if hit is not None:
                store(hit)
        missing = [job for job, hit in zip(jobs, cached) if hit is None]
        self.num_compiled_ahead = len(missing)
        # XLA compiles outside the GIL: on a many-core host (an accelerator's) compiles overlap almost fully;
        # tracing and lowering still take turns.
        workers = max(1, min(len(missing), (os.cpu_count() or 1), 8))
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                tqdm(total=len(missing), desc="compiling", disable=not progress or not missing, unit="fn") as bar:
            futures = {pool.submit(self._compile, name, lower): store for name, lower, store in missing}
            for future in as_completed(futures):
                futures[future](future.result())
                bar.update()
        if self.executable_cache:
            self.executable_cache.prune()
        return time.perf_counter() - start

    def _compile(self, name: str, lower):
        compiled = lower().compile(self._compiler_options())
        if self.executable_cache:
            self.executable_cache.save(name, compiled)
        return compiled

    def _module_name(self, name: str) -> str:
        """A compiled module's name, unique to this compile: executables deserialized into one process share a
        kernel-symbol namespace on XLA CPU (two modules of one name resolve each other's kernels: "function ...
        not found"), and a module that XLA's persistent cache already holds comes back from it in a form that
        serializes without its kernels. A fresh name per compile avoids both."""
        return f"{name}_{secrets.token_hex(6)}"

    @staticmethod
    def _compiler_options() -> dict:
        # Kernel symbols prefixed by the module name (see _module_name).
        if jax.default_backend() == "cpu":
            return {"xla_cpu_generate_unique_c_style_kernel_entry_points": True}
        return {}
