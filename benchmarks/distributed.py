"""Cost of multi-host serving and throughput of data parallelism, on CPU devices.

    .venv/bin/python benchmarks/distributed.py --out /tmp/distbench [--batch 8 --output-len 64]

Writes a random Llama, then runs each configuration in fresh processes (XLA_FLAGS must precede JAX):
- tp4: one process, 4 virtual devices, TP 4;
- tp4-2hosts: host 0 (LLM with num_hosts=2) + `python -m jaxserve --host-index 1`, 2 devices each, TP 4 over
  gloo; host 0's time spent pickling and sending the side-channel messages is reported too;
- dp1 / dp2: AsyncLLMEngine vs DataParallelEngine (2 replicas of TP 1) on 2 virtual devices, the same
  concurrent requests.
Each engine generates the workload once to compile, then once timed (greedy, ignore_eos).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# precompile off: the untimed first pass compiles only the shapes the workload uses.
FLAGS = {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 8, "max_num_batched_tokens": 128,
         "kv_cache_memory": 2**27, "precompile": False}


def workload(batch: int, prompt_len: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return [{"prompt_token_ids": rng.integers(100, 8000, size=prompt_len).tolist()} for _ in range(batch)]


def child(args) -> dict:
    from jaxserve import LLM, SamplingParams

    prompts = workload(args.batch, args.prompt_len)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    common = dict(model=args.model, checkpoint_cache_dir=str(Path(args.out) / f"ckpt-{args.role}"),
                  compilation_cache_dir=str(Path(args.out) / f"xla-{args.role}"), **FLAGS)
    if args.role.startswith("dp"):
        return asyncio.run(data_parallel(int(args.role[2:]), common, prompts, params))
    extra = {"tensor_parallel_size": 4}
    if args.role == "tp4-2hosts":
        extra.update(num_hosts=2, host_index=0, distributed_coordinator=args.coordinator)
    llm = LLM(**common, **extra)
    sent = {"seconds": 0.0, "bytes": 0, "messages": 0}
    runner = llm.engine.runner
    if hasattr(runner, "_broadcast"):  # host 0 of a multi-host run: time the side channel
        import pickle

        inner = runner._broadcast

        def timed(*message):
            start = time.perf_counter()
            inner(*message)
            sent["seconds"] += time.perf_counter() - start
            sent["bytes"] += len(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            sent["messages"] += 1

        runner._broadcast = timed
    llm.generate(prompts, params)  # compile every shape the workload uses
    sent.update(seconds=0.0, bytes=0, messages=0)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"role": args.role, "seconds": elapsed, "tokens": tokens, "side_channel": sent}


async def data_parallel(dp: int, common: dict, prompts, params) -> dict:
    from jaxserve.config import EngineConfig
    from jaxserve.data_parallel import build_async_engine

    engine = build_async_engine(EngineConfig(data_parallel_size=dp, **common))
    await engine.start()

    async def one(i, prompt, tag):
        return [o async for o in engine.generate(prompt, params, f"{tag}-{i}")][-1]

    async def run(tag):
        outs = await asyncio.gather(*(one(i, p, tag) for i, p in enumerate(prompts)))
        return sum(len(o.outputs[0].token_ids) for o in outs)

    await run("warm")
    start = time.perf_counter()
    tokens = await run("timed")
    elapsed = time.perf_counter() - start
    engine.shutdown()
    return {"role": f"dp{dp}", "seconds": elapsed, "tokens": tokens}


def spawn(args, role: str, devices: int, **env) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--role", role, "--out", args.out, "--model", args.model,
           "--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len),
           "--coordinator", args.coordinator or ""]
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **env}
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, text=True)


def result_of(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, f"exit {proc.returncode}"
    return json.loads(out.strip().splitlines()[-1])


def driver(args) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from random_checkpoint import saved_default_tokenizer, write_random_llama

    out = Path(args.out)
    args.model = str(write_random_llama(out / "model", saved_default_tokenizer(out), layers=4, hidden=256,
                                        heads=8, kv_heads=4, intermediate=768, vocab=8192))
    results = [result_of(spawn(args, "tp4", 4))]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        args.coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    leader = spawn(args, "tp4-2hosts", 2)
    follower_flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items() if k != "precompile"]
    follower = subprocess.Popen(
        [sys.executable, "-m", "jaxserve", "--model", args.model, "--tensor-parallel-size", "4",
         f"--checkpoint-cache-dir={out / 'ckpt-f'}", f"--compilation-cache-dir={out / 'xla-f'}", *follower_flags,
         "--no-precompile",
         "--distributed-coordinator", args.coordinator, "--num-hosts", "2", "--host-index", "1"],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results.append(result_of(leader))
    assert follower.wait(timeout=120) == 0
    results += [result_of(spawn(args, "dp1", 2)), result_of(spawn(args, "dp2", 2))]
    print(f"batch {args.batch}, prompt {args.prompt_len}, output {args.output_len} tokens (greedy, ignore_eos)")
    print("| configuration | wall (s) | tokens/s | ms per step (wall / output_len) | side channel |")
    print("|---|---|---|---|---|")
    for r in results:
        side = r.get("side_channel") or {}
        note = (f"{side['messages']} msgs, {side['bytes'] / max(side['messages'], 1):.0f} B each, "
                f"{1e3 * side['seconds']:.1f} ms in all") if side.get("messages") else ""
        print(f"| {r['role']} | {r['seconds']:.2f} | {r['tokens'] / r['seconds']:.0f} | "
              f"{1e3 * r['seconds'] / args.output_len:.1f} | {note} |")
    (out / "results.json").write_text(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--role", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    if args.role:
        print(json.dumps(child(args)))
    else:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        driver(args)


if __name__ == "__main__":
    main()
