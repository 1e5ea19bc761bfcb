"""The Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2/3) as one Flax NNX definition.

The module is only the definition: the engine splits it into (graphdef, state) once and jits a pure
function over the flattened state, so Flax never sits on the per-step hot path.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.gguf_reader import module_of
from jaxserve.models.lazy_tensors import StackedTensors, is_lazy
from jaxserve.pallas_kernels import block_quant, cpu_kernels, int8_rows
from jaxserve.pallas_kernels.attention import ragged_paged_attention, write_kv


class AttentionMetadata(NamedTuple):
    """Per-step, per-token and per-sequence arrays every layer's attention reads."""

    slot_mapping: jax.Array  # [T] where each new token's K/V goes
    kv_lens: jax.Array  # [S]
    page_indices: jax.Array  # [S, pages_per_seq]
    cu_q_lens: jax.Array  # [S + 1]
    num_seqs: jax.Array  # [1]
    layer_index: jax.Array | int = 0  # which layer of layer-stacked block-quantized weights to read

    def num_tokens(self) -> jax.Array:
        """[1]: the step's real tokens (padding slots repeat the last offset), which come first."""
        return self.cu_q_lens[-1:]


# The block formats (pallas_kernels/block_quant): GGUF's 4- and 8-bit blocks, and a bfloat16 model's weights
# in the same tiles.
BLOCK_FORMATS = ("q4", "q8", "bf16_blocks", "int8_rows")
# Leaves of block-quantized weights (pallas_kernels/block_quant). A scanned step reads them from the stacked
# [num_layers, ...] arrays in place (the kernels take the layer index), so the scan never slices them.
BLOCK_LEAVES = ("qweight", "scales", "mins")


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies, with the llama3 / linear scalings HF applies."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling_dict() or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
    return inv_freq.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin [T, D/2] of each position's rotary angles."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x: [T, heads, head_dim], rotate-half convention (as HF's Llama)."""
    cos, sin = (table[:, None, :] for table in rope_tables(positions, inv_freq))
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : x.shape[-1] // 2], xf[..., x.shape[-1] // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def fixed_order_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis (kept, size 1) in one order whatever the leading shape: halve and add
    elementwise until one column is left. XLA CPU vectorizes a row reduction differently below and above 8
    rows, which moved a row's norm by an ulp between batch sizes and, through the bfloat16 rounding of the
    next projection's input, its greedy tokens (benchmarks/batch_invariance.py)."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        folded = x[..., :half] + x[..., half:2 * half]
        if x.shape[-1] % 2:  # the odd column joins the first
            folded = jnp.concatenate([folded[..., :1] + x[..., -1:], folded[..., 1:]], axis=-1)
        x = folded
    return x


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean_square = fixed_order_sum(xf * xf) / xf.shape[-1]
        xf = xf * jax.lax.rsqrt(mean_square + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)

    def on_cpu(self, x, rows, delta):
        """(x + delta, the same norm of it) for float32 x and delta, one kernel pass (cpu_kernels.add_rms_norm);
        rows [1]: the step's real rows, the rest come back zero."""
        return cpu_kernels.add_rms_norm(x, delta, self.weight[...], self.eps, rows)


class Linear(nnx.Linear):
    """A projection whose dot runs in the weights' dtype and accumulates in float32, then returns the
    activations' dtype. On XLA CPU a bfloat16 x bfloat16 -> float32 dot streams half the bytes of a float32
    one and is faster from batch 2 up; a bfloat16-output dot is far slower (docs/benchmarks.md).

    `cpu_kernel` (pallas_kernels/cpu_kernels), for steps on one CPU device with whole weight arrays: "bf16"
    sends small-batch projections to the bf16 kernel; "int8" holds the kernel as int8 with a per-column
    power-of-two `weight_scale` and multiplies through the int8 kernel; "q4" / "q8" / "bf16_blocks" hold no
    kernel but GGUF's blocks or bfloat16 weights in the same tiles (`qweight`[, `scales`, `mins`]:
    pallas_kernels/block_quant), multiplied through its kernels at every batch size, possibly stacked over
    layers and picked by `layer_index`; "int8_rows" likewise holds int8 rows (`qweight`, `scales`:
    pallas_kernels/int8_rows), multiplied with int8 activations in AMX tiles."""

    def __init__(self, din, dout, bias, dtype, activation_dtype, rngs, cpu_kernel: str | None = None):
        super().__init__(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype,
                         preferred_element_type=jnp.float32, rngs=rngs)
        self.activation_dtype = activation_dtype
        self.cpu_kernel = cpu_kernel
        if cpu_kernel == "int8":
            self.kernel = nnx.Param(jnp.zeros((din, dout), jnp.int8))
            self.weight_scale = nnx.Param(jnp.ones((dout,), jnp.float32))
        elif cpu_kernel in BLOCK_FORMATS:
            _block_params(self, cpu_kernel, dout, din, dtype)

    def __call__(self, x, meta: AttentionMetadata | None = None):
        if self.cpu_kernel is None:
            return super().__call__(x).astype(self.activation_dtype)
        if self.cpu_kernel in BLOCK_FORMATS:
            y = _block_matmul(self, x, meta)
        elif self.cpu_kernel == "int8":
            y = cpu_kernels.int8_project(x, self.kernel[...], self.weight_scale[...])
        else:
            y = cpu_kernels.project(x, self.kernel[...], kernel=True)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.activation_dtype)


def _block_params(module: nnx.Module, fmt: str, rows: int, cols: int, dtype) -> None:
    """`module`'s weight [rows, cols] as block_quant's format `fmt` (replacing a `kernel` / `embedding`),
    multiplied in block_quant.multiply_dtype(dtype)."""
    tiles, per_tile = rows // block_quant.TILE, cols // block_quant.BLOCK * block_quant.TILE
    for name in ("kernel", "embedding"):
        if hasattr(module, name):
            setattr(module, name, None)
    module.block_format = fmt
    if fmt == "int8_rows":
        module.qweight = nnx.Param(jnp.zeros((rows // int8_rows.ROWS, cols * int8_rows.ROWS), jnp.int8))
        module.scales = nnx.Param(jnp.ones((rows // int8_rows.ROWS, int8_rows.ROWS), jnp.float32))
        module.mins = None
        module.multiply_dtype = jnp.dtype(jnp.int8)
        return
    qtype = {"q4": jnp.uint8, "q8": jnp.int8, "bf16_blocks": jnp.uint16}[fmt]
    module.qweight = nnx.Param(jnp.zeros((tiles, per_tile * (16 if fmt == "q4" else 32)), qtype))
    module.scales = None if fmt == "bf16_blocks" else nnx.Param(jnp.ones((tiles, per_tile), jnp.float32))
    module.mins = nnx.Param(jnp.zeros((tiles, per_tile), jnp.float32)) if fmt == "q4" else None
    # bfloat16 blocks multiply in float32 (their loops are the float32 ones), or in AMX tiles where there are some
    module.multiply_dtype = (block_quant.multiply_dtype(dtype) if fmt != "bf16_blocks"
                             else block_quant.bf16_blocks_multiply_dtype(dtype))


def _scales_mins(module: nnx.Module):
    return tuple(None if a is None else a[...] for a in (module.scales, module.mins))


def _block_matmul(module: nnx.Module, x, meta: AttentionMetadata | None = None, rows=None, gated=False, **pairs):
    """Through the block kernel; with the step's `meta`, the layer's slice of stacked weights, and the
    padding rows skipped (or past `rows`, int32 [1], when given instead). `gated`, `pairs` (paired_out,
    num_rows): block_quant.matmul's."""
    layer = meta.layer_index if meta is not None and module.qweight[...].ndim == 3 else 0
    if module.block_format == "int8_rows":  # no paired activations: the next projection quantizes its own
        return int8_rows.matmul(x, module.qweight[...], module.scales[...], layer,
                                meta.num_tokens() if meta is not None else rows, gated=gated,
                                argmax=pairs.get("argmax", False))
    return block_quant.matmul(x, module.qweight[...], *_scales_mins(module), layer,
                              meta.num_tokens() if meta is not None else rows,
                              bf16=module.multiply_dtype == jnp.bfloat16, gated=gated, **pairs)


class BlockEmbed(nnx.Module):
    """A token embedding kept in GGUF's blocks: rows are dequantized when looked up, and as a tied LM head
    the logits come from block_quant's kernel."""

    def __init__(self, vocab_size: int, hidden_size: int, fmt: str, dtype):
        _block_params(self, fmt, vocab_size, hidden_size, dtype)

    def lookup(self, token_ids):
        if self.block_format == "int8_rows":
            return int8_rows.lookup_rows(self.qweight[...], self.scales[...], token_ids)
        return block_quant.lookup_rows(self.qweight[...], *_scales_mins(self), token_ids)

    def attend(self, hidden, rows=None):
        return _block_matmul(self, hidden, rows=rows)


# Projections that read the same input, held as one block-quantized weight when all their parts share a block
# format: one kernel call (and one quantization of the activations) instead of three or two. A decode step's
# small calls each cost ~10 us of hand-off to the thread pool on top of their weights (docs/benchmarks.md).
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _fused_format(kernel, fused: str, bias: bool = False) -> str | None:
    """The block format of `fused`'s parts when they all have the same one (and no bias), else None."""
    formats = {kernel(part) for part in FUSED_PROJECTIONS[fused]}
    return formats.pop() if len(formats) == 1 and not bias and formats <= set(BLOCK_FORMATS) else None


def _split_columns(y, sizes):
    return jnp.split(y, np.cumsum(sizes)[:-1].tolist(), axis=-1)


def _rotated(cfg: ModelConfig, layer_index, arrays, rope):
    """`rope` applied to `arrays` in the layers that rotate q/k (all but SmolLM3's NoPE layers). A scanned step's
    layer index is traced: both are computed and the layer's flag picks one."""
    flags = cfg.rope_layers
    if flags is None or all(flags):
        return tuple(rope(x) for x in arrays)
    if isinstance(layer_index, int):
        return tuple(rope(x) if flags[layer_index] else x for x in arrays)
    use = jnp.asarray(flags)[layer_index]
    return tuple(jnp.where(use, rope(x), x) for x in arrays)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, act, backend: str, rngs: nnx.Rngs, mesh=None, kernels=None):
        self.cfg = cfg
        self.backend = backend
        self.mesh = mesh  # the tensor-parallel mesh a Pallas kernel is mapped over (by KV head), or None
        h, d = cfg.hidden_size, cfg.head_dim
        kernel = kernels or (lambda name: None)
        self.qkv_sizes = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
        fused = _fused_format(kernel, "qkv_proj", cfg.attention_bias)
        if fused:
            self.qkv_proj = Linear(h, sum(self.qkv_sizes), False, dtype, act, rngs, fused)
        else:
            self.q_proj = Linear(h, self.qkv_sizes[0], cfg.attention_bias, dtype, act, rngs, kernel("q_proj"))
            self.k_proj = Linear(h, self.qkv_sizes[1], cfg.attention_bias, dtype, act, rngs, kernel("k_proj"))
            self.v_proj = Linear(h, self.qkv_sizes[2], cfg.attention_bias, dtype, act, rngs, kernel("v_proj"))
        self.o_proj = Linear(cfg.num_heads * d, h, False, dtype, act, rngs, kernel("o_proj"))
        if cfg.qk_norm:  # Qwen3: each head's query and key normalized (one weight over head_dim) before RoPE
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)

    def __call__(self, x, positions, kv_cache, meta: AttentionMetadata):
        cfg, t = self.cfg, x.shape[0]
        inv_freq = rope_inv_freq(cfg)
        if self._rope_on_cpu(kv_cache[0]):  # RoPE and the KV write in one kernel pass
            cos, sin = rope_tables(positions, inv_freq)
            q, k_pages, v_pages = cpu_kernels.rope_write_kv(self.qkv_proj(x, meta), cos, sin, meta.slot_mapping,
                                                            *kv_cache, meta.num_tokens(), cfg.num_heads)
            return self._attend(q, k_pages, v_pages, meta)
        if hasattr(self, "qkv_proj"):
            q, k, v = _split_columns(self.qkv_proj(x, meta), self.qkv_sizes)
        else:
            q, k, v = self.q_proj(x, meta), self.k_proj(x, meta), self.v_proj(x, meta)
        q, k = q.reshape(t, cfg.num_heads, cfg.head_dim), k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotated(cfg, meta.layer_index, (q, k), lambda x: apply_rope(x, positions, inv_freq))
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        k_pages, v_pages = write_kv(*kv_cache, k, v, meta.slot_mapping, backend=self.backend)
        return self._attend(q, k_pages, v_pages, meta)

    def _rope_on_cpu(self, k_pages) -> bool:
        """Whether cpu_kernels.rope_write_kv does this layer's RoPE and KV write: the CPU kernels' path with one
        fused float32 qkv projection, RoPE in every layer and no per-head norm before it."""
        cfg = self.cfg
        return (self.backend == "cpu" and hasattr(self, "qkv_proj") and self.qkv_proj.activation_dtype == jnp.float32
                and not cfg.qk_norm and (cfg.rope_layers is None or all(cfg.rope_layers))
                and cpu_kernels.glue_fits(k_pages) and cpu_kernels.available())

    def _attend(self, q, k_pages, v_pages, meta: AttentionMetadata):
        cfg, t = self.cfg, q.shape[0]
        out = ragged_paged_attention(
            q, k_pages, v_pages, meta.kv_lens, meta.page_indices, meta.cu_q_lens, meta.num_seqs,
            sm_scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window, backend=self.backend,
            mesh=self.mesh)
        return self.o_proj(out.reshape(t, -1), meta), (k_pages, v_pages)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, act, rngs: nnx.Rngs, kernels=None):
        kernel = kernels or (lambda name: None)
        h, i = cfg.hidden_size, cfg.intermediate_size
        fused = _fused_format(kernel, "gate_up_proj")
        if fused:
            self.gate_up_proj = Linear(h, 2 * i, False, dtype, act, rngs, fused)
        else:
            self.gate_proj = Linear(h, i, False, dtype, act, rngs, kernel("gate_proj"))
            self.up_proj = Linear(h, i, False, dtype, act, rngs, kernel("up_proj"))
        self.down_proj = Linear(i, h, False, dtype, act, rngs, kernel("down_proj"))

    def __call__(self, x, meta: AttentionMetadata | None = None):
        if hasattr(self, "gate_up_proj"):  # the CPU kernels' blocks: silu(gate) * up comes out of their call
            fused, down = self.gate_up_proj, self.down_proj
            if self._pairs_fit():  # ... straight into down's AMX tiles, in the bfloat16 down rounds it to
                pairs = _block_matmul(fused, x, meta, gated=True, paired_out=True)
                return _block_matmul(down, pairs, meta, num_rows=x.shape[0]).astype(down.activation_dtype)
            return self.down_proj(_block_matmul(fused, x, meta, gated=True).astype(fused.activation_dtype), meta)
        gate, up = self.gate_proj(x, meta), self.up_proj(x, meta)
        return self.down_proj(jax.nn.silu(gate) * up, meta)

    def _pairs_fit(self) -> bool:
        """Both projections multiply in bfloat16 AMX tiles (block_quant.amx_fits) and down is a plain block one
        (not int8 rows, which quantize their float32 input themselves)."""
        fused, down = self.gate_up_proj, self.down_proj
        return (down.bias is None and fused.activation_dtype == jnp.float32 and fused.multiply_dtype == jnp.bfloat16
                and _in_tiles(down, down.in_features) and down.block_format != "int8_rows")


def _in_tiles(module: nnx.Module, width: int) -> bool:
    """A block-format module (Linear or BlockEmbed) multiplying in AMX tiles, where its kernel's AMX-only
    options (argmax; block_quant.matmul's paired activations, with bfloat16 ones) fit `width`
    (block_quant.amx_fits; int8 rows always have them)."""
    block = getattr(module, "cpu_kernel", None) in BLOCK_FORMATS or isinstance(module, BlockEmbed)
    if block and module.block_format == "int8_rows":
        return True
    return block and module.multiply_dtype == jnp.bfloat16 and block_quant.amx_fits(width)


def norms_on_cpu(backend: str, activation_dtype) -> bool:
    """Whether a model's norms, with the residual add before each, are one CPU kernel pass
    (RMSNorm.on_cpu): the CPU kernels' path (attention backend "cpu") with float32 activations. The layers then
    pass (residual, delta) on instead of the hidden states."""
    return backend == "cpu" and jnp.dtype(activation_dtype) == jnp.float32 and cpu_kernels.available()


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, act, backend: str, rngs: nnx.Rngs, mesh=None, kernels=None):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, act, backend, rngs, mesh, kernels)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, act, rngs, kernels)
        self.norms_on_cpu = norms_on_cpu(backend, act)

    def __call__(self, x, positions, kv_cache, meta):
        if self.norms_on_cpu:
            # x is (residual, delta), the hidden state their sum: the previous layer's MLP output is added in
            # this layer's first norm pass (LlamaForCausalLM.residual_stream, final_norm)
            residual, delta = x
            rows = meta.num_tokens()
            residual, normed = self.input_layernorm.on_cpu(residual, rows, delta)
            attn_out, kv_cache = self.self_attn(normed, positions, kv_cache, meta)
            residual, normed = self.post_attention_layernorm.on_cpu(residual, rows, attn_out)
            return (residual, self.mlp(normed, meta)), kv_cache
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, meta)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x), meta), kv_cache


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, attention_backend: str = "xla",
                 rngs: nnx.Rngs | None = None, activation_dtype=None, attention_mesh=None, cpu_kernel=None,
                 block_formats: tuple[tuple[str, str], ...] = ()):
        """`dtype`: the weights'; `activation_dtype` (default: the same): hidden states and the KV cache;
        `attention_mesh`: a tensor-parallel mesh to map the Pallas attention kernel over (by KV head);
        `cpu_kernel`: None, or "bf16" / "int8": the layers' projections and the head may use the CPU kernels
        (one device, whole weight arrays; see Linear); `block_formats`: (module name, "q4" / "q8" /
        "bf16_blocks") pairs for the modules ("q_proj", ..., "embed_tokens", "lm_head") whose weights stay in
        GGUF's blocks or go into the same tiles."""
        rngs = rngs or nnx.Rngs(0)
        act = activation_dtype or dtype
        self.cfg = cfg
        self.activation_dtype = act
        self.cpu_kernel = cpu_kernel
        formats = dict(block_formats)
        kernels = lambda name: formats.get(name, cpu_kernel)
        outer_kernel = "bf16" if cpu_kernel else None  # the head's weights stay bf16 (shared with the scan path)
        if "embed_tokens" in formats:
            self.embed_tokens = BlockEmbed(cfg.vocab_size, cfg.hidden_size, formats["embed_tokens"], dtype)
        else:
            self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                          rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype, act, attention_backend, rngs, attention_mesh, kernels)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.norms_on_cpu = norms_on_cpu(attention_backend, act)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, False, dtype, jnp.float32, rngs, formats.get("lm_head", outer_kernel))

    def embed(self, token_ids):
        if isinstance(self.embed_tokens, BlockEmbed):
            return self.embed_tokens.lookup(token_ids).astype(self.activation_dtype)
        return jnp.take(self.embed_tokens.embedding[...], token_ids, axis=0).astype(self.activation_dtype)

    def __call__(self, token_ids, positions, kv_caches, meta: AttentionMetadata):
        """Returns the final hidden states [T, hidden] and the updated per-layer (k, v) pages."""
        x = self.residual_stream(self.embed(token_ids))
        new_caches = []
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x, kv_cache = layer(x, positions, kv_cache, meta._replace(layer_index=index))
            new_caches.append(kv_cache)
        return self.final_norm(x, meta), new_caches

    def residual_stream(self, x):
        """What the layers pass on: the hidden states, or on the CPU kernels' path (residual, delta) with delta
        still to be added (DecoderLayer), zero before the first layer."""
        return (x, jnp.zeros_like(x)) if self.norms_on_cpu else x

    def final_norm(self, x, meta: AttentionMetadata):
        if self.norms_on_cpu:
            residual, delta = x
            return self.norm.on_cpu(residual, meta.num_tokens(), delta)[1]
        return self.norm(x)

    def compute_logits(self, hidden, rows=None):
        """Logits [S, V] of hidden [S, hidden]. `rows` (int32 [1], optional): only the first rows are real; a
        block-quantized head leaves the rest zero instead of computing them (a step's padding rows)."""
        if self.lm_head is not None:
            if self.lm_head.cpu_kernel in BLOCK_FORMATS:
                return _block_matmul(self.lm_head, hidden, rows=rows)
            return self.lm_head(hidden)
        if isinstance(self.embed_tokens, BlockEmbed):
            return self.embed_tokens.attend(hidden, rows)
        return cpu_kernels.project(hidden, self.embed_tokens.embedding[...], w_transposed=True,
                                  kernel=self.cpu_kernel is not None)

    def greedy_tokens(self, hidden, rows=None):
        """int32 [S]: each row's first largest logit's index, from a block-quantized head in AMX tiles that
        never writes the logits (block_quant.matmul's argmax: the sampler's greedy token of compute_logits);
        None where the head is not such a one."""
        head = self.lm_head if self.lm_head is not None else self.embed_tokens
        if not _in_tiles(head, self.cfg.vocab_size):
            return None
        return _block_matmul(head, hidden, rows=rows, argmax=True)


class ScannedModel(NamedTuple):
    """The model split for a jitted forward that scans one layer definition over stacked layer weights.

    Compiling one layer body instead of num_layers copies keeps compile time small; the KV cache of all
    layers is one array per K/V, [num_layers * num_pages, page_size, kv_heads, head_dim], and layer l uses
    pages [l * num_pages, (l + 1) * num_pages) so the attention boundary stays per-layer.
    """

    outer_graphdef: object  # the model without its layers
    outer_treedef: object
    layer_graphdef: object
    layer_treedef: object
    layer_paths: tuple  # parameter paths inside one layer, in leaf order
    outer_paths: tuple


def abstract_split(cfg: ModelConfig, dtype, attention_backend: str, activation_dtype=None,
                   attention_mesh=None, cpu_kernel=None, block_formats=()) -> ScannedModel:
    """split_for_scan of the abstract model. Every layer shares one definition, so a one-layer model is
    enough (building all layers' abstract parameters costs most of a second at start-up)."""
    one_layer = dataclasses.replace(cfg, num_layers=1)
    return split_for_scan(abstract_model(one_layer, dtype, attention_backend, activation_dtype, attention_mesh,
                                         cpu_kernel, block_formats))


def split_for_scan(model: LlamaForCausalLM) -> ScannedModel:
    layer_graphdef, layer_state = nnx.split(model.layers[0])
    layers = model.layers
    model.layers = nnx.List([])
    try:
        outer_graphdef, outer_state = nnx.split(model)
    finally:
        model.layers = layers
    return ScannedModel(outer_graphdef, jax.tree.structure(outer_state), layer_graphdef,
                        jax.tree.structure(layer_state),
                        tuple(p for p, _ in nnx.to_flat_state(layer_state)),
                        tuple(p for p, _ in nnx.to_flat_state(outer_state)))


def scanned_params(split: ScannedModel, flat_params: dict[str, np.ndarray], num_layers: int):
    """(outer leaves, stacked layer leaves [num_layers, ...]) from the flat "/"-joined parameter dict (lazy
    checkpoint tensors stay lazy: stacked views that read only what a device's shard needs)."""
    key = lambda path: "/".join(map(str, path))
    outer = [flat_params[key(p)] for p in split.outer_paths]
    stacked = []
    for p in split.layer_paths:
        layers = [flat_params[f"layers/{i}/" + key(p)] for i in range(num_layers)]
        stacked.append(StackedTensors(tuple(layers)) if is_lazy(layers[0]) else np.stack(layers))
    return outer, stacked


def _layer_meta(meta: AttentionMetadata, layer_index, num_pages: int, page_size: int) -> AttentionMetadata:
    """Layer l's pages are [l * num_pages, (l + 1) * num_pages) of the combined cache."""
    first_page = layer_index * num_pages
    return meta._replace(page_indices=meta.page_indices + first_page,
                         slot_mapping=meta.slot_mapping + first_page * page_size, layer_index=layer_index)


def _merge_layer(split: ScannedModel, leaves):
    return nnx.merge(split.layer_graphdef, jax.tree.unflatten(split.layer_treedef, leaves))


def _outer_module(split: ScannedModel, outer_leaves) -> LlamaForCausalLM:
    """The model outside its layers, rebuilt from the split's outer leaves (inside a jitted step)."""
    return nnx.merge(split.outer_graphdef, jax.tree.unflatten(split.outer_treedef, outer_leaves))


def scanned_forward(split: ScannedModel, outer_leaves, layer_leaves, token_ids, positions, kv_cache,
                    meta: AttentionMetadata, num_pages: int):
    """Final hidden states [T, hidden] and the updated (k, v) cache, one scanned layer body.

    `layer_leaves` are stacked [num_layers, ...]. Compiles fast; XLA CPU copies each layer's weight slice
    before its dots, which costs ~40% of a small-batch step (see unrolled_forward). Block-quantized weights
    (BLOCK_LEAVES) are not sliced: their kernels read the stacked arrays in place at the layer's index.
    """
    outer = _outer_module(split, outer_leaves)
    page_size = kv_cache[0].shape[1]
    in_place = [path[-1] in BLOCK_LEAVES for path in split.layer_paths]

    def body(carry, xs):
        x, k_all, v_all = carry
        sliced, layer_index = xs
        sliced = iter(sliced)
        leaves = [whole if keep else next(sliced) for whole, keep in zip(layer_leaves, in_place)]
        layer_meta = _layer_meta(meta, layer_index, num_pages, page_size)
        x, (k_all, v_all) = _merge_layer(split, leaves)(x, positions, (k_all, v_all), layer_meta)
        return (x, k_all, v_all), None

    x = outer.residual_stream(outer.embed(token_ids))
    num_layers = layer_leaves[0].shape[0]
    sliced = [leaf for leaf, keep in zip(layer_leaves, in_place) if not keep]
    (x, k_all, v_all), _ = jax.lax.scan(body, (x, *kv_cache), (sliced, jnp.arange(num_layers, dtype=jnp.int32)))
    return outer.final_norm(x, meta), (k_all, v_all)


def unrolled_forward(split: ScannedModel, outer_leaves, per_layer_leaves, token_ids, positions, kv_cache,
                     meta: AttentionMetadata, num_pages: int):
    """As scanned_forward, with one array per layer weight and the layers unrolled: the dots read the
    weights in place (no per-layer slice copy), at the price of a longer compile."""
    outer = _outer_module(split, outer_leaves)
    page_size = kv_cache[0].shape[1]
    x, cache = outer.residual_stream(outer.embed(token_ids)), tuple(kv_cache)
    for index, leaves in enumerate(per_layer_leaves):
        x, cache = _merge_layer(split, leaves)(x, positions, cache, _layer_meta(meta, index, num_pages,
                                                                                 page_size))
    return outer.final_norm(x, meta), cache


def logits_from_hidden(split: ScannedModel, outer_leaves, hidden, rows=None):
    outer = _outer_module(split, outer_leaves)
    return outer.compute_logits(hidden, rows)


def greedy_tokens_from_hidden(split: ScannedModel, outer_leaves, hidden, rows=None):
    """LlamaForCausalLM.greedy_tokens of the outer module's leaves (None where its head cannot)."""
    outer = _outer_module(split, outer_leaves)
    return outer.greedy_tokens(hidden, rows)


def abstract_model(cfg: ModelConfig, dtype, attention_backend: str, activation_dtype=None,
                   attention_mesh=None, cpu_kernel=None, block_formats=()) -> LlamaForCausalLM:
    """The model's structure with shapes only, no parameter memory."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype, attention_backend, nnx.Rngs(0), activation_dtype,
                                                   attention_mesh, cpu_kernel, block_formats))


def round_projections_to_int8(flat_params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The layers' projection kernels rounded to int8 with per-column power-of-two scales, kept in their dtype
    (bfloat16 holds every rounded value exactly), for int8 weights (pallas_kernels/cpu_kernels.quantize_int8)."""
    out = dict(flat_params)
    for key, w in flat_params.items():
        if key.startswith("layers/") and key.endswith("/kernel"):
            q, scale = cpu_kernels.quantize_int8(np.asarray(w, np.float32))
            out[key] = (q.astype(np.float32) * scale).astype(w.dtype)
    return out


def hf_name_for(path: tuple) -> tuple[str, bool]:
    """Map an NNX parameter path to its Hugging Face tensor name, and whether HF stores it transposed."""
    names = [str(p) for p in path]
    leaf = names[-1]
    if names[0] == "embed_tokens":
        return "model.embed_tokens.weight", False
    if names[0] == "lm_head":
        return "lm_head.weight", True
    if names[0] == "norm":
        return "model.norm.weight", False
    # ("layers", i, module[, submodule], leaf)
    prefix = f"model.layers.{names[1]}." + ".".join(names[2:-1])
    if leaf == "kernel":
        return prefix + ".weight", True
    if leaf == "bias":
        return prefix + ".bias", False
    return prefix + ".weight", False


def flat_params_from_hf(cfg: ModelConfig, tensors, dtype, block_formats=()) -> dict[str, np.ndarray]:
    """HF-named float32 tensors → {"/"-joined NNX path: array in the model's layout and dtype}. The modules in
    `block_formats` come as block_quant's packed arrays (models/gguf_reader.iter_gguf_hf_tensors), kept as
    they are, except int8 rows, which are packed here from the float [out, in] weights."""
    model = abstract_model(cfg, dtype, "xla", block_formats=block_formats)
    int8_modules = {module for module, fmt in block_formats if fmt == "int8_rows"}
    packed = {}

    def tensor(name):  # int8 rows packed once for all their leaves
        if module_of(name) not in int8_modules or name not in tensors:
            return tensors.get(name)
        if name not in packed:
            packed[name] = int8_rows.pack(np.asarray(tensors[name], np.float32))
        return packed[name]

    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = hf_name_for(path)
        module, leaf = str(path[-2]), str(path[-1])
        if module in FUSED_PROJECTIONS:  # the parts' tiles, stacked along the output rows
            parts = [tensor(name.replace(module, part)) for part in FUSED_PROJECTIONS[module]]
            if any(not isinstance(part, dict) or leaf not in part for part in parts):
                raise ValueError(f"checkpoint lacks the blocks of {name!r}'s parts")
            arr = {leaf: np.concatenate([part[leaf] for part in parts])}
        elif name in tensors:
            arr = tensor(name)
        else:
            raise ValueError(f"checkpoint has no tensor {name!r} needed by {cfg.architecture}")
        if leaf in BLOCK_LEAVES:
            if not isinstance(arr, dict) or arr[leaf].shape != var.shape:
                raise ValueError(f"tensor {name!r} is not in the blocks its module expects ({var.shape})")
            out["/".join(map(str, path))] = arr[leaf]
            continue
        arr = arr if is_lazy(arr) else np.asarray(arr)  # lazy: read later, one device's slice at a time
        arr = arr.T if transposed else arr
        if arr.shape != var.shape:
            raise ValueError(f"tensor {name!r} has shape {arr.shape}, expected {var.shape}")
        out["/".join(map(str, path))] = arr.astype(jnp.dtype(dtype))
    return out
