"""Data parallel 2 (two engine replicas on 8 virtual CPU devices) and one engine, given the same concurrent
greedy requests, with TP 1 and with TP 2 inside each engine. All share one compilation cache directory, as
a server's replicas do. Usage: python data_parallel_worker.py OUT_DIR MODEL_DIR; writes OUT_DIR/results.json:
{"dp1-tp1" | "dp2-tp1" | "dp1-tp2" | "dp2-tp2": {"tokens", "routed", "generated_per_replica", "devices"}}."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

PROMPTS = [[412, 9051, 77, 3020], [15, 28000, 611], [4242, 90, 1234, 31000, 5], [777] * 6, [5, 6, 7], [8, 9]]


async def run(out: Path, model_dir: str, dp: int, tp: int) -> dict:
    from jaxserve.config import EngineConfig
    from jaxserve.data_parallel import DataParallelEngine, build_async_engine
    from jaxserve.sampling_params import RequestOutputKind, SamplingParams

    config = EngineConfig(model=model_dir, dtype="float32", data_parallel_size=dp, tensor_parallel_size=tp,
                          precompile=tp == 1, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                          block_size=4, kv_cache_memory=2**21, checkpoint_cache_dir=str(out / "ckpt"),
                          compilation_cache_dir=str(out / "xla"))
    # Precompiled single-device engines save serialized executables to the shared directory; replica 1 must
    # not load replica 0's (bound to device 0). TP 2 skips precompiling to keep the test short.
    engine = build_async_engine(config)
    await engine.start()
    params = SamplingParams(temperature=0, max_tokens=6, output_kind=RequestOutputKind.FINAL_ONLY)

    async def one(i: int, ids: list[int]) -> list[int]:
        outs = [o async for o in engine.generate({"prompt_token_ids": ids}, params, f"req-{i}")]
        return list(outs[-1].outputs[0].token_ids)

    tokens = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(PROMPTS)))
    replicas = engine.replicas if isinstance(engine, DataParallelEngine) else [engine]
    result = {"tokens": tokens, "routed": getattr(engine, "routed", [len(PROMPTS)]),
              "generated_per_replica": [r.stats().generation_tokens_total for r in replicas],
              "devices": [[d.id for d in r.engine.runner.mesh.devices.flat] for r in replicas]}
    engine.shutdown()
    return result


def main(out_dir: str, model_dir: str) -> None:
    out = Path(out_dir)
    results = {f"dp{dp}-tp{tp}": asyncio.run(run(out, model_dir, dp, tp)) for tp in (1, 2) for dp in (1, 2)}
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
