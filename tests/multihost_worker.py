"""One process of a multi-host tensor-parallel run on localhost (CPU devices, gloo collectives), or the
single-device reference. Drives the model runner directly with the same steps on every host (what host 0's
scheduler would broadcast): a 13-token prefill, then two greedy decode steps.

Usage: python multihost_worker.py OUT_DIR MODEL_DIR single
       python multihost_worker.py OUT_DIR MODEL_DIR host HOST_INDEX NUM_HOSTS COORDINATOR TP_SIZE
Writes OUT_DIR/<single|hostN>.json: {"tokens": [...], "logprobs": [[...], ...], "devices": n, "local": n}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

PROMPT = [412, 9051, 77, 3020, 15, 28000, 611, 4242, 90, 1234, 31000, 5, 777]
PAGE_SIZE = 4


def scheduled(tokens: list[int], computed: int):
    """A stand-in for the scheduler's ScheduledSeq: the sequence's pages are 0, 1, 2, ... in order."""
    pages = list(range(-(-len(tokens) // PAGE_SIZE)))
    seq = SimpleNamespace(num_computed_tokens=computed, pages=pages, token_slice=lambda a, b: tokens[a:b])
    return SimpleNamespace(seq=seq, num_new_tokens=len(tokens) - computed, samples=True)


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


def main(out_dir: str, model_dir: str, role: str, *rest: str) -> None:
    if role == "host":
        host, num_hosts, coordinator, tp = int(rest[0]), int(rest[1]), rest[2], int(rest[3])
        from jaxserve.models.sharding import initialize_multihost

        initialize_multihost(coordinator, num_hosts, host)
        run(Path(out_dir), f"host{host}", model_dir, tp)
    else:
        run(Path(out_dir), "single", model_dir, 1)


if __name__ == "__main__":
    main(*sys.argv[1:])
