"""A tiny random Llama-family checkpoint written with numpy (no torch), with the SmolLM2 tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxserve.models.weights import HF_ARCHITECTURES

_TOKENIZER_DIRS: dict[str, Path] = {}


def saved_default_tokenizer(root: Path) -> Path:
    """The default model's tokenizer saved as HF files once per process (building it takes seconds)."""
    if "dir" not in _TOKENIZER_DIRS:
        from jaxserve.models.weights import load_tokenizer, resolve_model_source

        out = root / "smollm2-tokenizer"
        load_tokenizer(resolve_model_source(None)).save_pretrained(out)
        _TOKENIZER_DIRS["dir"] = out
    return _TOKENIZER_DIRS["dir"]


def write_random_llama(out: Path, tokenizer_dir: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64,
                       heads: int = 4, kv_heads: int = 2, intermediate: int = 128, vocab: int = 49152,
                       max_positions: int = 1024, qkv_bias: bool = False, tied: bool = True, std: float = 0.2,
                       qk_norm: bool = False, head_dim: int | None = None) -> Path:
    """A Llama; a Qwen2 with `qkv_bias`; a Qwen3 with `qk_norm` (per-head q/k norms; `head_dim` its own)."""
    rng = np.random.default_rng(seed)
    head_dim = head_dim or hidden // heads
    w = lambda *shape: (rng.standard_normal(shape) * std).astype(np.float32)
    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": 1 + w(hidden) * 0.1}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(intermediate, hidden),
            p + "mlp.up_proj.weight": w(intermediate, hidden),
            p + "mlp.down_proj.weight": w(hidden, intermediate),
            p + "input_layernorm.weight": 1 + w(hidden) * 0.1,
            p + "post_attention_layernorm.weight": 1 + w(hidden) * 0.1,
        })
        if qkv_bias:
            for name, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                tensors[p + f"self_attn.{name}_proj.bias"] = w(n * head_dim)
        if qk_norm:
            tensors[p + "self_attn.q_norm.weight"] = 1 + w(head_dim) * 0.5
            tensors[p + "self_attn.k_norm.weight"] = 1 + w(head_dim) * 0.5
    if not tied:
        tensors["lm_head.weight"] = w(vocab, hidden)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    arch = "qwen3" if qk_norm else "qwen2" if qkv_bias else "llama"
    config = {
        "architectures": [next(name for name, ours in HF_ARCHITECTURES.items() if ours == arch)],
        "model_type": arch, "head_dim": head_dim, "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config))
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out
