"""Whether greedy outputs depend on the batch: prompts generated together against each generated alone.

    .venv/bin/python benchmarks/batch_invariance.py [--dtype auto] [--kv-cache-dtype auto] [--max-tokens 8]

Prints, per prompt template, the indices of the 32 prompts whose batched text differs from their text alone.
"""
from __future__ import annotations

import argparse

from jaxserve import LLM, SamplingParams

LONG = "Here is a long list of facts about the city of Lyon, its rivers, its food and its history. " * 8
# The last one is ~180 tokens: decode attention then splits each token's positions into parts.
TEMPLATES = ["Count from {}:", "The number {} is", "Q: What is {} plus 3? A:", LONG + "Fact number {}:"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    llm = LLM(model=args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    total = 0
    for template in TEMPLATES:
        prompts = [template.format(i) for i in range(32)]
        together = [o.outputs[0].text for o in llm.generate(prompts, params)]
        alone = [llm.generate([p], params)[0].outputs[0].text for p in prompts]
        differ = [i for i in range(32) if together[i] != alone[i]]
        total += len(differ)
        shown = template if len(template) < 60 else "..." + template[-40:]
        print(f"{shown!r}: {len(differ)} of 32 differ {differ}")
    print(f"total: {total} of {32 * len(TEMPLATES)}")


if __name__ == "__main__":
    main()
