"""Runs in a fresh process with 8 virtual CPU devices (XLA_FLAGS must be set before JAX starts).

Usage: python tensor_parallel_worker.py OUT_DIR TP_SIZE[,TP_SIZE...] [--bench]
Builds three tiny random checkpoints (Llama, Qwen2 with q/k/v bias, Qwen3 with q/k norms), generates greedily at each tensor
parallel size and writes {model: {tp: {tokens, logprobs, kv_spec, shard_shapes}}} to OUT_DIR/results.json.
With --bench it instead times one decode step and one prefill step of a small random Llama at each size
(the numbers in docs/benchmarks.md, "Tensor parallelism").
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from random_checkpoint import saved_default_tokenizer, write_random_llama  # noqa: E402

# Llama: 4 heads / 2 KV heads, so TP 2 splits KV heads and TP 4 must replicate them.
# Qwen2: 6 heads / 2 KV heads and an untied LM head, so TP 4 replicates attention entirely.
MODELS = {
    "llama": dict(hidden=64, heads=4, kv_heads=2, intermediate=128),
    "qwen2": dict(hidden=48, heads=6, kv_heads=2, intermediate=96, qkv_bias=True, tied=False),
    # Qwen3: per-head q/k norms (replicated weights over split heads), head_dim 32 with hidden 64.
    "qwen3": dict(hidden=64, heads=4, kv_heads=2, intermediate=128, qk_norm=True, head_dim=32),
}
ENGINE_ARGS = dict(dtype="float32", precompile=False, max_model_len=128, max_num_seqs=4,
                   max_num_batched_tokens=32, block_size=4, kv_cache_memory=2 * 2**20)
PROMPTS = [[100 + 37 * i % 40000 for i in range(n)] for n in (5, 19, 41)]
NEW_TOKENS, TOP = 6, 4


def step_collectives(runner) -> dict[str, int]:
    """Collective ops XLA put in the compiled decode step (the scanned layer body appears once)."""
    import collections
    import re

    import numpy as np

    from jaxserve.model_runner import _layout

    shape = runner.config.buckets.bucket_for(4, 4)
    packed = np.zeros(sum(n for _, n in _layout(shape, runner.config.pages_per_seq).values()), np.int32)
    hlo = runner.step_fn(shape).lower(*runner.step_params(shape), runner.kv_cache, packed,
                                      runner.no_previous_tokens).compile().as_text()
    collective = r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    ops = re.findall(r"= \S+ " + collective + r"(?:-start)?\(", hlo)
    return dict(collections.Counter(ops))


def run_model(llm) -> dict:
    from jaxserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP)
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    # Seeded sampling with filtering and penalties, and prompt logprobs, through the same sharded weights.
    sampled = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_p=0.9, top_k=50, presence_penalty=0.5,
                                                   seed=7, max_tokens=NEW_TOKENS, ignore_eos=True,
                                                   prompt_logprobs=2))
    runner = llm.engine.runner
    q_kernel = runner.params[1][runner.split.layer_paths.index(("self_attn", "q_proj", "kernel"))]
    return {
        "tokens": [o.token_ids for o in outs],
        "sampled_tokens": [o.outputs[0].token_ids for o in sampled],
        "prompt_logprobs": [[{str(t): lp.logprob for t, lp in pos.items()} for pos in o.prompt_logprobs[1:]]
                            for o in sampled],
        "logprobs": [[{str(t): lp.logprob for t, lp in pos.items()} for pos in o.logprobs] for o in outs],
        "kv_spec": list(runner.kv_cache[0].sharding.spec),  # [] = replicated
        "kv_shard_shape": list(runner.kv_cache[0].addressable_shards[0].data.shape),
        "q_kernel_shard_shape": list(q_kernel.addressable_shards[0].data.shape),
        "embed_shard_shape": list(runner.params[0][0].addressable_shards[0].data.shape),
        "mesh_size": runner.mesh.size,
        "num_pages": runner.config.num_pages,
        "collectives": step_collectives(runner),
        "checkpoint_bytes_read": llm.engine.loaded.checkpoint_bytes_read,
    }


def main(out_dir: str, tp_sizes: str) -> None:
    from jaxserve import LLM

    root = Path(out_dir)
    tokenizer = saved_default_tokenizer(root)
    results = {}
    for name, shape in MODELS.items():
        model_dir = write_random_llama(root / name, tokenizer, seed=len(name), layers=2, **shape)
        results[name] = {}
        for tp in map(int, tp_sizes.split(",")):
            llm = LLM(model=str(model_dir), checkpoint_cache_dir=str(root / "ckpt"), tensor_parallel_size=tp,
                      **ENGINE_ARGS)
            results[name][tp] = run_model(llm)
            results[name][tp]["checkpoint_bytes"] = (model_dir / "model.safetensors").stat().st_size
            del llm
    # The Pallas kernel (interpreted on the CPU) mapped over a mesh that splits the KV heads.
    llm = LLM(model=str(root / "llama"), checkpoint_cache_dir=str(root / "ckpt"), tensor_parallel_size=2,
              attention_backend="pallas", **ENGINE_ARGS)
    results["llama_pallas_tp2"] = run_model(llm)
    results["llama_pallas_tp2"]["attention"] = llm.engine.runner.config.attention_backend
    (root / "results.json").write_text(json.dumps(results))


BENCH_MODEL = dict(layers=8, hidden=512, heads=8, kv_heads=4, intermediate=1536)


def bench(out_dir: str, tp_sizes: str, rounds: int = 15) -> None:
    """Median wall time of the jitted model step plus greedy sampling, on all-padding steps of fixed shape.

    The engines of every size are built first and timed round-robin, so load from other processes on the
    machine spreads over all sizes alike.
    """
    import statistics
    import time

    import jax
    import numpy as np

    from jaxserve import LLM
    from jaxserve.buckets import StepShape
    from jaxserve.model_runner import StepInput, _layout
    from jaxserve.sampler import SamplerFlags
    from jaxserve.sampling_metadata import placeholder_sampling_tensors

    root = Path(out_dir)
    model_dir = write_random_llama(root / "bench", saved_default_tokenizer(root), **BENCH_MODEL)
    flags, sizes = SamplerFlags(), [int(tp) for tp in tp_sizes.split(",")]
    shapes = (StepShape(8, 8), StepShape(256, 2))  # decode of 8 sequences; a 256-token prefill
    runners = {tp: LLM(model=str(model_dir), checkpoint_cache_dir=str(root / "ckpt"), tensor_parallel_size=tp,
                       dtype="float32", precompile=False, max_model_len=512, max_num_seqs=8,
                       max_num_batched_tokens=256, block_size=16, kv_cache_memory=64 * 2**20).engine.runner
               for tp in sizes}
    times = {(tp, shape): [] for tp in sizes for shape in shapes}
    for round_index in range(rounds + 2):  # the first two rounds compile and warm up
        for (tp, shape), samples in times.items():
            runner = runners[tp]
            packed = np.zeros(sum(n for _, n in _layout(shape, runner.config.pages_per_seq).values()), np.int32)
            tensors = placeholder_sampling_tensors(flags, shape.num_seqs, runner.model_config.vocab_size)
            start = time.perf_counter()
            last_hidden, _ = runner.execute(StepInput(shape, packed, 0, []))
            jax.block_until_ready(runner.sample(last_hidden, tensors, flags))
            if round_index >= 2:
                samples.append(time.perf_counter() - start)
    print(f"model {BENCH_MODEL}, {len(jax.devices())} devices, median of {rounds}")
    for tp in sizes:
        print(f"tp {tp}: " + ", ".join(f"T={shape.num_tokens}: {1000 * statistics.median(times[tp, shape]):.1f} ms"
                                       for shape in shapes), flush=True)


if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench(*[a for a in sys.argv[1:] if a != "--bench"])
    else:
        main(*sys.argv[1:])
