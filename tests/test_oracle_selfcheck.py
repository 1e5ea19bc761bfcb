"""Self-checks of the transformers oracle and the tiny checkpoints, before parity tests trust them.

Needs .venv-oracle (`make oracle-venv`); the fixtures skip without it.  The wire-format test needs
nothing.  The oracle fixtures (oracle, tiny_*) come from tests/tiny_models.py via conftest.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from oracle.client import OracleError, default_gguf_path
from oracle.wire import decode_arrays_hook, encode_array

TINY_FIXTURES = ["tiny_llama", "tiny_llama3", "tiny_qwen2", "tiny_mistral"]

# fixture -> (architectures entry, layers, tied embeddings, rope type, has q/k/v biases)
EXPECTED_CONFIG = {
    "tiny_llama": ("LlamaForCausalLM", 2, False, "default", False),
    "tiny_llama3": ("LlamaForCausalLM", 3, True, "llama3", False),
    "tiny_qwen2": ("Qwen2ForCausalLM", 2, True, "default", True),
    "tiny_mistral": ("MistralForCausalLM", 4, False, "default", False),
}

PROMPTS = [[1, 504, 3575, 282, 4649], [42, 7, 30000, 12, 9, 49151, 3]]


def test_wire_roundtrip_is_exact():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((3, 5)).astype(np.float32), np.arange(7, dtype=np.int64),
              np.array([np.inf, -0.0, 1e-38], dtype=np.float32)]
    payload = json.dumps({"a": [encode_array(a) for a in arrays]})
    decoded = json.loads(payload, object_hook=decode_arrays_hook)["a"]
    for original, back in zip(arrays, decoded):
        assert back.dtype == original.dtype and back.shape == original.shape
        assert np.array_equal(back.view(np.uint8), original.view(np.uint8))


@pytest.mark.oracle
@pytest.mark.parametrize("fixture", TINY_FIXTURES)
def test_greedy_equals_argmax_of_teacher_forced_logits(request, oracle, fixture):
    """The cached decode loop and one uncached forward pass must agree on every step."""
    model_dir = request.getfixturevalue(fixture)
    steps = 6
    results = oracle.greedy(model_dir, PROMPTS, steps, full_logits="all", top_k=3)
    full = oracle.logits(model_dir, [p + r["tokens"] for p, r in zip(PROMPTS, results)])
    for prompt, result, logits in zip(PROMPTS, results, full):
        assert len(result["tokens"]) == steps and result["finish_reason"] == "length"
        forced = logits[len(prompt) - 1:-1]  # logits that predicted each generated token
        assert forced.shape == result["logits"].shape == (steps, 49152)
        assert list(forced.argmax(-1)) == result["tokens"]
        np.testing.assert_allclose(result["logits"], forced, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(result["first_logits"], result["logits"][0])
        assert [ids[0] for ids in result["top_ids"]] == result["tokens"]
        # Random weights scaled so tokens are well separated: logits spread, top-1 above top-2.
        assert forced.std(-1).min() > 0.5
        top = np.array(result["top_logits"])
        assert np.all(top[:, 0] > top[:, 1])
        as64 = result["logits"].astype(np.float64)
        peak = as64.max(-1, keepdims=True)
        logsumexp = (peak + np.log(np.exp(as64 - peak).sum(-1, keepdims=True)))[:, 0]
        np.testing.assert_allclose(np.array(result["top_logprobs"])[:, 0], top[:, 0] - logsumexp,
                                   atol=1e-5)


@pytest.mark.oracle
@pytest.mark.parametrize("fixture", TINY_FIXTURES)
def test_tiny_checkpoint_loads_back_with_expected_config(request, fixture):
    model_dir = request.getfixturevalue(fixture)
    architecture, layers, tied, rope_type, biases = EXPECTED_CONFIG[fixture]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["intermediate_size"], config["vocab_size"]) == (
        64, 4, 2, 16, 128, 49152)
    assert config["num_hidden_layers"] == layers
    assert config["tie_word_embeddings"] is tied
    assert config["dtype"] == "float32"
    assert config["rope_parameters"]["rope_type"] == rope_type

    tensors = load_file(str(model_dir / "model.safetensors"))
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert ("lm_head.weight" in tensors) is (not tied)
    assert ("model.layers.0.self_attn.q_proj.bias" in tensors) is biases
    assert tensors["model.embed_tokens.weight"].shape == (49152, 64)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    if biases:  # random, not zero: a loader that drops biases must fail parity
        assert np.abs(tensors["model.layers.0.self_attn.k_proj.bias"]).max() > 0.1
    norm = tensors["model.norm.weight"]  # near one but not one: norm weights must be applied
    assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.01

    from transformers import AutoTokenizer  # the 3.12 env reads the saved tokenizer too
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config["bos_token_id"],
                                                                config["eos_token_id"])
    assert "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


@pytest.mark.oracle
def test_default_gguf_through_transformers_answers_a_chat_prompt(oracle):
    gguf = default_gguf_path()
    prompt = oracle.chat_prompt(gguf, [{"role": "user", "content": "What is the capital of France?"}])
    assert prompt[-4:] == [1, 520, 9531, 198]  # "<|im_start|>assistant\n" in SmolLM2's vocabulary
    (result,) = oracle.greedy(gguf, [prompt], 12, stop_token_ids=[2], decode=True)
    first = result["first_logits"]
    assert first.shape == (49152,) and np.all(np.isfinite(first))
    assert int(first.argmax()) == result["tokens"][0]
    assert "Paris" in result["text"]
    assert result["finish_reason"] == "stop" and result["tokens"][-1] == 2


@pytest.mark.oracle
def test_oracle_reports_failures_with_the_traceback(oracle, tiny_llama):
    with pytest.raises(OracleError, match="unknown op"):
        oracle.run({"op": "no_such_op"})
    with pytest.raises(OracleError, match="empty prompt"):
        oracle.greedy(tiny_llama, [[]], 2)
    assert oracle.run({"op": "info"})["torch"].startswith("2.13.0")  # still serving after errors
