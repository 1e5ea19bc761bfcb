"""How closely each weight path follows the default GGUF's exact weights (dequantized to float32).

    .venv/bin/python benchmarks/gguf_fidelity.py

Greedy, 6 chat prompts × 32 tokens, for `--quantization none` with bfloat16 weights and for the default GGUF
blocks, against `--quantization none --dtype float32`: per prompt, the tokens equal before the first divergence,
and the largest first-step difference among the reference's top-5 logprobs.
"""
from __future__ import annotations

import numpy as np

from jaxserve import LLM, SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "List three prime numbers.", "Who wrote Hamlet?", "Translate 'good morning' to Spanish."]
PATHS = {"float32": dict(dtype="float32", quantization="none"), "bfloat16": dict(quantization="none"),
         "gguf blocks": dict()}


def main() -> None:
    results = {}
    for name, kwargs in PATHS.items():
        llm = LLM(checkpoint_cache_dir=None, precompile=False, max_model_len=256, max_num_seqs=8, **kwargs)
        tok = llm.get_tokenizer()
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                      tokenize=False), add_special_tokens=False) for p in PROMPTS]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5))
        results[name] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
        del llm
    for name in list(PATHS)[1:]:
        equal, deltas = [], []
        for (ref_ids, ref_lp), (ids, lp) in zip(results["float32"], results[name]):
            equal.append(next((i for i, (a, b) in enumerate(zip(ref_ids, ids)) if a != b), len(ids)))
            deltas.append(max(abs(lp[0][t].logprob - ref_lp[0][t].logprob) for t in ref_lp[0] if t in lp[0]))
        print(f"{name}: tokens equal to float32 {equal}; first-step max |Δ logprob| {np.round(deltas, 4).tolist()}")


if __name__ == "__main__":
    main()
