"""Tiny random checkpoints built with transformers' own model classes (runs under .venv-oracle).

Each architecture variant exercises a different loader/model path of the JAX engine:

  llama        plain RoPE, untied lm_head (Llama-2 style)
  llama3_rope  llama3 RoPE scaling, tied embeddings (Llama-3.2 style)
  qwen2        q/k/v biases, tied embeddings (Qwen2.5-0.5B style)
  qwen3        per-head q/k RMSNorm, head_dim 32 (heads x head_dim != hidden), tied (Qwen3-0.6B style)
  smollm3      no RoPE in every second layer (SmolLM3's NoPE layers, every fourth in the real model), tied
  mistral      untied lm_head, no sliding window (Mistral-7B-v0.3 style)

All share GQA (4 query heads, 2 kv heads, head_dim 16 but qwen3's 32) and the SmolLM2 vocabulary (49152), so the
SmolLM2 tokenizer taken from the default GGUF can be saved next to the weights.

Weights are re-initialised here rather than left to transformers' init: HF's init uses std 0.02,
zero biases and unit norm weights, which would give near-uniform attention, logits too close to tell
tokens apart, and a loader that drops biases or norm weights would still pass.  We use larger
normal weights, random biases and norm weights near (not at) one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import transformers

# Shared shape of every tiny model.
TINY_SHAPE = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    max_position_embeddings=2048,
)

WEIGHT_STD = 0.2  # q.k scores and logits with std ~1-3: attention is peaked, greedy argmax robust
BIAS_STD = 0.2
NORM_WEIGHT_JITTER = 0.1  # norm weights ~ 1 + N(0, 0.1)

# llama3 RoPE with a small original context (64) so that, with head_dim 16 and theta 5e5, the
# unscaled, interpolated and fully scaled frequency bands all occur and matter at short positions.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@dataclass(frozen=True)
class TinyArch:
    config_class: str
    model_class: str
    num_hidden_layers: int
    tie_word_embeddings: bool
    config_extra: dict


TINY_ARCHS = {
    "llama": TinyArch("LlamaConfig", "LlamaForCausalLM", 2, False,
                      {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "llama3_rope": TinyArch("LlamaConfig", "LlamaForCausalLM", 3, True,
                            {"rope_parameters": dict(LLAMA3_ROPE)}),
    "qwen2": TinyArch("Qwen2Config", "Qwen2ForCausalLM", 2, True,
                      {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                       "use_sliding_window": False}),
    "qwen3": TinyArch("Qwen3Config", "Qwen3ForCausalLM", 2, True,
                      {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                       "use_sliding_window": False, "attention_bias": False, "head_dim": 32}),
    "smollm3": TinyArch("SmolLM3Config", "SmolLM3ForCausalLM", 4, True,
                        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                         "no_rope_layer_interval": 2, "use_sliding_window": False, "pad_token_id": None}),
    "mistral": TinyArch("MistralConfig", "MistralForCausalLM", 4, False,
                        {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                         "sliding_window": None}),
}


def build_config(arch: str, bos_token_id: int | None, eos_token_id: int | None):
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {sorted(TINY_ARCHS)}")
    spec = TINY_ARCHS[arch]
    config_cls = getattr(transformers, spec.config_class)
    return config_cls(
        **{**TINY_SHAPE, **spec.config_extra},
        num_hidden_layers=spec.num_hidden_layers,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic (seeded, fixed parameter order) re-initialisation; see the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # tied weights appear once
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name.endswith("bias"):
            param.copy_(BIAS_STD * noise)
        elif "norm" in name:
            param.copy_(1.0 + NORM_WEIGHT_JITTER * noise)
        else:
            param.copy_(WEIGHT_STD * noise)


def make_tiny(arch: str, out_dir: str, seed: int, tokenizer) -> dict:
    """Write a float32 safetensors checkpoint + tokenizer into out_dir; returns a summary."""
    config = build_config(arch, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model_cls = getattr(transformers, TINY_ARCHS[arch].model_class)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    randomize_weights(model, seed)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "out": os.path.abspath(out_dir),
        "arch": arch,
        "model_type": config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "files": sorted(os.listdir(out_dir)),
    }
