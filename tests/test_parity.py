"""Greedy tokens and logits equal Hugging Face transformers (PyTorch, the oracle) on tiny random models."""
import math

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams

ARGS = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
            kv_cache_memory=4 * 2**20)
NEW_TOKENS = 8
TOP = 5


def make_prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 40000, size=n).tolist() for n in (5, 17, 41)]


def engine_greedy(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP)
    return [o.outputs[0] for o in llm.generate(prompts, params)]


def assert_matches_oracle(outputs, expected):
    for out, want in zip(outputs, expected):
        assert out.token_ids == list(want["tokens"][:NEW_TOKENS])
        for step, position in enumerate(out.logprobs):
            want_ids = [int(t) for t in want["top_ids"][step]]
            want_lps = [float(v) for v in want["top_logprobs"][step]]
            got = {tok: lp.logprob for tok, lp in position.items()}
            for tok, lp in zip(want_ids, want_lps):
                if tok in got:
                    assert math.isclose(got[tok], lp, abs_tol=2e-4), (step, tok, got[tok], lp)
            assert want_ids[0] in got


@pytest.mark.parametrize("arch", ["llama", "llama3_rope", "qwen2", "qwen3", "smollm3", "mistral"])
def test_greedy_parity_batched(arch, tiny_model_cache, oracle, tmp_path):
    model_dir = tiny_model_cache.get(arch)
    prompts = make_prompts()
    expected = oracle.greedy(model_dir, prompts, NEW_TOKENS, top_k=TOP, full_logits="none")
    llm = LLM(model=str(model_dir), checkpoint_cache_dir=str(tmp_path), precompile=False, **ARGS)
    assert_matches_oracle(engine_greedy(llm, prompts), expected)
    if arch == "llama":
        # Same answers when the prompts come back through the prefix cache ...
        assert_matches_oracle(engine_greedy(llm, prompts), expected)
        assert llm.engine.kv_cache.stats.hits > 0


def test_parity_without_prefix_cache_and_under_preemption(tiny_llama, oracle, tmp_path):
    prompts = make_prompts(seed=1)
    expected = oracle.greedy(tiny_llama, prompts, NEW_TOKENS, top_k=TOP, full_logits="none")
    no_cache = LLM(model=str(tiny_llama), checkpoint_cache_dir=str(tmp_path), precompile=False,
                   **{**ARGS, "enable_prefix_caching": False})
    assert_matches_oracle(engine_greedy(no_cache, prompts), expected)
    per_page = no_cache.engine.runner.kv_bytes_per_page(no_cache.engine.model_config, 4, "float32")
    # 19 usable pages of 4 tokens: the 3 prompts need 24 (5+17+41 tokens plus 8 new each).
    tight = LLM(model=str(tiny_llama), checkpoint_cache_dir=str(tmp_path), precompile=False,
                **{**ARGS, "kv_cache_memory": 20 * per_page, "max_model_len": 64})
    assert_matches_oracle(engine_greedy(tight, prompts), expected)
    assert tight.engine.scheduler.num_preemptions_total > 0


def test_default_gguf_first_step_logits_match_transformers(oracle, tmp_path):
    from jaxserve.models.weights import default_gguf_path

    # Dequantized (transformers' own GGUF path); the blocks' 8-bit activations are held to the dequantized
    # weights in test_block_quant.
    llm = LLM(checkpoint_cache_dir=None, precompile=False, dtype="float32", quantization="none", max_model_len=256,
              max_num_seqs=2, max_num_batched_tokens=64)
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok.encode(text, add_special_tokens=False)
    want = oracle.greedy(default_gguf_path(), [prompt], 4, top_k=TOP, full_logits="none")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=TOP))
    got = out[0].outputs[0]
    assert got.token_ids == list(want[0]["tokens"][:4])
    for tok_id, lp in zip(want[0]["top_ids"][0], want[0]["top_logprobs"][0]):
        assert math.isclose(got.logprobs[0][int(tok_id)].logprob, float(lp), abs_tol=5e-4)


def test_pallas_backend_in_interpret_mode_matches_transformers(tiny_llama, oracle, tmp_path):
    prompts = make_prompts(seed=2)[:2]
    steps = 3
    expected = oracle.greedy(tiny_llama, prompts, steps, top_k=TOP, full_logits="none")
    llm = LLM(model=str(tiny_llama), checkpoint_cache_dir=str(tmp_path), precompile=False,
              attention_backend="pallas", **{**ARGS, "block_size": 16})
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [list(e["tokens"][:steps]) for e in expected]
