"""Frozen configuration passed down from the CLI / LLM(...) to every layer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
# The KV cache dtypes a user may ask for (besides auto), as JAX names them. vLLM's fp8 names are float8 caches
# with a scale of 1 (no calibration): values saturate at the format's largest (pallas_kernels.reference).
KV_CACHE_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp8": "float8_e4m3fn",
                   "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, independent of where weights came from."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF `rope_scaling` dict frozen as sorted (key, value) pairs, e.g. llama3 scaling.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection bias (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each query and key head before RoPE (Qwen3)
    rope_layers: tuple[bool, ...] | None = None  # per layer, whether it rotates q/k (SmolLM3's NoPE layers); None: all
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None


# Draft tokens a sequence may get a step when speculation is on and the count is not given. A sequence's
# drafts grow by one a step while they are kept and shrink to what was kept on a miss (speculative.py), so a
# sequence whose text does not repeat drafts little. 8 against 4 on a 2-core CPU, greedy 128-token outputs that
# repeat themselves: 1.3-1.5x tokens/s alone, 1.08x at 8 sequences, the same at 32 (docs/benchmarks.md round 26).
DEFAULT_DRAFT_TOKENS = 8


@dataclass(frozen=True)
class EngineConfig:
    """Every engine flag of the CLI; each is also an `LLM(...)` keyword of the same name."""

    model: str | None = None  # HF dir, .gguf file or hub id; None = embedded SmolLM2
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    kv_cache_dtype: str = "auto"  # auto or a KV_CACHE_DTYPES key (engine_setup.resolve_kv_cache_dtype)
    # None | int8: weight-only int8 (per-column power-of-two scales) for the CPU kernels' small-batch steps
    quantization: str | None = None
    max_model_len: int | None = None
    seed: int = 0
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = default budget
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # Dispatch each step before the previous step's sampled tokens reach the host (they stay on the device and
    # feed the next step), so the host's bookkeeping overlaps the device's work; steps fall back to one at a time
    # while a request needs its tokens on the host first (guided decoding, penalties, prompt-lookup drafts).
    # None: on for accelerators, off on the CPU (whose "device" is the host's own cores: nothing to overlap).
    async_scheduling: bool | None = None
    max_num_seqs: int | None = None  # None: 64 on the CPU, 256 on accelerators (with_platform_defaults)
    max_num_batched_tokens: int | None = None  # None: 512 on the CPU, 2048 (at least max_num_seqs) elsewhere
    max_logprobs: int = 20
    scheduling_policy: str = "fcfs"  # or "priority": requests' priority (lower first), then arrival
    # Sampling defaults for what a request leaves unset: "auto" = the model folder's generation_config.json,
    # "vllm" = none (OpenAI's defaults), or another folder holding a generation_config.json
    generation_config: str = "auto"
    # A JSON object of generation-config fields (e.g. '{"temperature": 0.5}') merged over those defaults
    override_generation_config: str | None = None
    attention_backend: str = "auto"  # auto | pallas | xla | cpu
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    # Which replica's device group (devices [rank * tp, (rank + 1) * tp)) this engine uses; the data-parallel
    # router (jaxserve/data_parallel.py) sets it, one engine per rank. Not a CLI flag.
    data_parallel_rank: int | None = None
    # Multi-host (jax.distributed): host 0's HOST:PORT, the number of processes and this one's index.
    # Host 0 serves and schedules; the others replay its model steps (jaxserve/multihost.py).
    distributed_coordinator: str | None = None
    num_hosts: int = 1
    host_index: int = 0
    compilation_cache_dir: str | None = None  # None = ~/.cache/jaxserve/xla
    checkpoint_cache_dir: str | None = None  # None = ~/.cache/jaxserve/checkpoints
    # Disk budgets (GiB) of the caches above, least recently used entries out first; -1: none. Converted
    # checkpoints larger than theirs are not written (0: none are). The compiled budget holds for XLA's cache
    # and for jaxserve's serialized executables each (0: neither is kept).
    checkpoint_cache_max_gb: float = 16.0
    compilation_cache_max_gb: float = 4.0
    guided_decoding_backend: str = "llguidance"
    # Prompt-lookup speculation (jaxserve/speculative.py): draft tokens per greedy sequence and step (0 = off),
    # in decode steps of at most speculative_max_rows rows, drafts included (decode steps wider than max_num_seqs
    # get buckets of their own; steps with prompt chunks stay within max_num_seqs rows).
    # None: DEFAULT_DRAFT_TOKENS without async scheduling (the CPU), 0 with it (a drafting request would step
    # one at a time)
    num_speculative_tokens: int | None = None
    speculative_max_rows: int = 128
    prompt_lookup_min: int = 2  # the n-grams looked up: the longest n in [min, max] that occurred before
    prompt_lookup_max: int = 4
    precompile: bool = True
    trust_remote_code: bool = False

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def with_platform_defaults(self, platform: str) -> "EngineConfig":
        """Batch limits, async scheduling and speculation left unset, for the platform: a 2-core CPU's steps are
        compute-bound well before 64 sequences and 512 tokens; an accelerator's batches are as large as vLLM's
        defaults. Accelerators overlap steps (26-31% a step on an H200) instead of drafting by default."""
        seqs, tokens = (64, 512) if platform == "cpu" else (256, 2048)
        seqs = seqs if self.max_num_seqs is None else self.max_num_seqs
        tokens = max(tokens, seqs) if self.max_num_batched_tokens is None else self.max_num_batched_tokens
        one_device = self.tensor_parallel_size == 1 and self.num_hosts == 1  # where steps can overlap
        overlap = (platform != "cpu" and one_device) if self.async_scheduling is None else self.async_scheduling
        drafts = self.num_speculative_tokens
        if drafts is None:
            drafts = 0 if overlap else DEFAULT_DRAFT_TOKENS
        return self.replace(max_num_seqs=seqs, max_num_batched_tokens=tokens, async_scheduling=overlap,
                            num_speculative_tokens=drafts)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
