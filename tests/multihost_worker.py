"""One process of a multi-host tensor-parallel run on localhost (CPU devices, gloo collectives), or the
single-device reference.

`single` / `host`: drive the model runner directly with the same steps on every host (what host 0's
scheduler would broadcast): a 13-token prefill, then two greedy decode steps. Writes OUT_DIR/<name>.json:
{"tokens": [...], "logprobs": [[...], ...], "devices": n, "local": n}.
`llm` / `llm-leader`: the real engine, LLM(...).generate over SERVING_REQUESTS, on one device or as host 0
of a multi-host run (the other hosts run `jaxserve --host-index I`). Writes OUT_DIR/<llm|llm-leader>.json.

Usage: python multihost_worker.py OUT_DIR MODEL_DIR single
       python multihost_worker.py OUT_DIR MODEL_DIR host HOST_INDEX NUM_HOSTS COORDINATOR TP_SIZE
       python multihost_worker.py OUT_DIR MODEL_DIR llm
       python multihost_worker.py OUT_DIR MODEL_DIR llm-leader NUM_HOSTS COORDINATOR TP_SIZE
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

PROMPT = [412, 9051, 77, 3020, 15, 28000, 611, 4242, 90, 1234, 31000, 5, 777]
PAGE_SIZE = 4


def scheduled(tokens: list[int], computed: int):
    """A stand-in for the scheduler's ScheduledSeq: the sequence's pages are 1, 2, 3, ... in order (page 0 is
    scratch: a step's padding tokens write there)."""
    pages = list(range(1, 1 - (-len(tokens) // PAGE_SIZE)))
    seq = SimpleNamespace(num_computed_tokens=computed, pages=pages, token_slice=lambda a, b: tokens[a:b],
                          num_pending_tokens=0)
    return SimpleNamespace(seq=seq, num_new_tokens=len(tokens) - computed, samples=True, draft_index=0,
                           draft_token=-1)


def run(out: Path, name: str, model_dir: str, tp: int) -> None:
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxserve.config import EngineConfig
    from jaxserve.engine_setup import load_engine_model

    config = EngineConfig(model=model_dir, dtype="float32", tensor_parallel_size=tp, precompile=False,
                          max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16, block_size=PAGE_SIZE,
                          kv_cache_memory=2**20, checkpoint_cache_dir=str(out / f"ckpt-{name}"),
                          compilation_cache_dir=str(out / f"xla-{name}"))
    runner = load_engine_model(config).runner
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    tokens, computed, logprobs = list(PROMPT), 0, []
    for _ in range(3):
        step = runner.prepare([scheduled(tokens, computed)])
        _, hidden = runner.execute(step)
        n = len(tokens) - computed
        targets = np.zeros(step.shape.num_tokens, np.int32)  # scored against token 0: any fixed id works
        _, _, top_ids, top_lp = runner.prompt_logprobs(hidden, targets, 4)
        top_ids, top_lp = gather(top_ids)[n - 1], gather(top_lp)[n - 1]
        logprobs.append([float(v) for v in top_lp])
        computed = len(tokens)
        tokens.append(int(top_ids[0]))
    import jax

    result = {"tokens": tokens[len(PROMPT):], "logprobs": logprobs, "devices": len(jax.devices()),
              "local": len(jax.local_devices()), "mesh": runner.mesh.size,
              "kv_local_shards": len(runner.kv_cache[0].addressable_shards)}
    (out / f"{name}.json").write_text(json.dumps(result))


# Engine flags every host of the serving test uses (a follower gets them as CLI flags).
SERVING_FLAGS = {"dtype": "float32", "max_model_len": 64, "max_num_seqs": 2, "max_num_batched_tokens": 16,
                 "block_size": PAGE_SIZE, "kv_cache_memory": 2**20}
# (prompt token ids, SamplingParams kwargs): greedy with logprobs, seeded top-k sampling, prompt logprobs;
# four requests on max_num_seqs=2 take prefill, mixed and decode steps of several shapes.
SERVING_REQUESTS = [
    (PROMPT, {"temperature": 0, "max_tokens": 8, "logprobs": 2}),
    ([5, 6, 7, 8, 9, 10, 11], {"temperature": 0.8, "top_k": 20, "seed": 7, "max_tokens": 6}),
    ([1000, 2000, 3000], {"temperature": 0, "max_tokens": 5, "prompt_logprobs": 2}),
    ([42] * 9, {"temperature": 0, "max_tokens": 7, "repetition_penalty": 1.3}),
]


def run_llm(out: Path, name: str, model_dir: str, **multihost) -> None:
    from jaxserve import LLM, SamplingParams

    llm = LLM(model=model_dir, precompile=True, checkpoint_cache_dir=str(out / f"ckpt-{name}"),
              compilation_cache_dir=str(out / f"xla-{name}"), **SERVING_FLAGS, **multihost)
    prompts = [{"prompt_token_ids": ids} for ids, _ in SERVING_REQUESTS]
    outputs = llm.generate(prompts, [SamplingParams(**kw) for _, kw in SERVING_REQUESTS])
    as_dicts = lambda positions: [{str(t): lp.logprob for t, lp in pos.items()} for pos in positions or [] if pos]
    requests = [{"tokens": list(o.outputs[0].token_ids), "logprobs": as_dicts(o.outputs[0].logprobs),
                 "prompt_logprobs": as_dicts(o.prompt_logprobs)} for o in outputs]
    runner = llm.engine.runner
    result = {"requests": requests, "mesh": runner.mesh.size, "runner": type(runner).__name__}
    (out / f"{name}.json").write_text(json.dumps(result))


def main(out_dir: str, model_dir: str, role: str, *rest: str) -> None:
    if role == "llm":
        run_llm(Path(out_dir), "llm", model_dir)
    elif role == "llm-leader":
        num_hosts, coordinator, tp = int(rest[0]), rest[1], int(rest[2])
        run_llm(Path(out_dir), "llm-leader", model_dir, num_hosts=num_hosts, host_index=0,
                distributed_coordinator=coordinator, tensor_parallel_size=tp)
    elif role == "host":
        host, num_hosts, coordinator, tp = int(rest[0]), int(rest[1]), rest[2], int(rest[3])
        from jaxserve.models.sharding import initialize_multihost

        initialize_multihost(coordinator, num_hosts, host)
        run(Path(out_dir), f"host{host}", model_dir, tp)
    else:
        run(Path(out_dir), "single", model_dir, 1)


if __name__ == "__main__":
    main(*sys.argv[1:])
