"""jaxserve and its peers side by side, interleaved: every server is up at once and each load run alternates
between them, so that each ratio compares runs minutes (not a whole matrix) apart.

    /tmp/peers/bench/bin/python benchmarks/interleaved.py --who jaxserve vllm --rounds 3 --out /tmp/inter
    ... --matrix 32:64 --loadgen-args="--temperature 0.8"

On a shared machine whose speed drifts by a third over minutes, servers measured one after the other (as
benchmarks/side_by_side.sh does) can land in different phases of the drift; here both sides of a ratio are
measured back to back, in turns (A B, then B A in the next round), on the same prompts (fresh ones each round,
so no prefix cache has seen them). The shared bench's load generator (`../shared/bench/loadgen.py`) drives
every run; servers and their flags are side_by_side.sh's. The servers not under load are paused (SIGSTOP
to their process groups, SIGCONT for their turn): idle, vLLM's processes still used 0.1-0.2 of a core, taken
from the server under test (`--no-pause` keeps them running; their CPU use is recorded either way). Prints one
row per run and the ratios of the first server to each other one, per round and as medians; writes every record
as JSON lines under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.environ.get("BENCH", os.path.join(PROJECT, "..", "shared", "bench"))
PEERS = os.environ.get("PEERS") or os.path.join(os.environ.get("TMPDIR", "/tmp"), "peers")
sys.path.insert(0, BENCH)
from bench_peer import tree_stats  # noqa: E402  (the shared bench's process-tree RSS and CPU)


def servers() -> dict[str, dict]:
    """name -> port, command and environment (side_by_side.sh's servers)."""
    gguf = os.path.join(PEERS, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    hf = os.path.join(PEERS, "models", "smollm2-hf")
    jaxserve = [os.path.join(PROJECT, ".venv", "bin", "jaxserve"), "--host", "127.0.0.1"]
    # LLAMA_SERVER: another build of it (this version's AMX kernels died of SIGILL on the AMX machine; round 32)
    llama_server = os.environ.get("LLAMA_SERVER") or os.path.join(PEERS, "src", "llama.cpp", "build", "bin",
                                                                  "llama-server")
    llama = [llama_server, "-m", gguf, "--host", "127.0.0.1", "-t", "2", "-tb", "2", "-c", "16384", "--kv-unified",
             "-cb", "--no-webui"]
    return {
        "jaxserve": {"port": 8110, "cmd": jaxserve + ["--port", "8110"], "env": {"JAX_PLATFORMS": "cpu"}},
        "jaxserve-nospec": {"port": 8111, "cmd": jaxserve + ["--port", "8111", "--num-speculative-tokens", "0"],
                            "env": {"JAX_PLATFORMS": "cpu"}},
        # the GGUF's own blocks in bfloat16 tiles (the default before int8 rows, on AMX machines)
        "jaxserve-gguf": {"port": 8112, "cmd": jaxserve + ["--port", "8112", "--quantization", "gguf"],
                          "env": {"JAX_PLATFORMS": "cpu"}},
        "vllm": {"port": 8102,
                 "cmd": [os.path.join(PEERS, "vllm", "bin", "python"), "-m", "vllm.entrypoints.openai.api_server",
                         "--model", hf, "--host", "127.0.0.1", "--port", "8102", "--dtype", "bfloat16",
                         "--max-model-len", "2048"],
                 "env": {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}},
        "llama-np8": {"port": 8104, "cmd": llama + ["--port", "8104", "-np", "8"], "env": {}},
        "llama-np32": {"port": 8105, "cmd": llama + ["--port", "8105", "-np", "32"], "env": {}},
    }


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except Exception:
        return False


def start(name: str, spec: dict, out_dir: str, timeout_s: float = 600) -> tuple[subprocess.Popen, dict]:
    log = open(os.path.join(out_dir, f"{name}_server.log"), "w")
    began = time.perf_counter()
    proc = subprocess.Popen(spec["cmd"], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **spec["env"]},
                            start_new_session=True)
    while not healthy(spec["port"]):
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode} before it was healthy; see {log.name}")
        if time.perf_counter() - began > timeout_s:
            stop(proc)
            raise SystemExit(f"{name} not healthy after {timeout_s} s; see {log.name}")
        time.sleep(0.25)
    return proc, {"record": "server", "server": name, "startup_s": round(time.perf_counter() - began, 2)}


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def pause(proc: subprocess.Popen, paused: bool) -> None:
    try:
        os.killpg(proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)
    except ProcessLookupError:  # it exited; the next run against it reports the failure
        pass


def load_run(name: str, port: int, concurrency: int, requests: int, seed: int, extra: list[str],
             out_dir: str) -> dict:
    out = os.path.join(out_dir, "loadgen.tmp")
    command = [sys.executable, os.path.join(BENCH, "loadgen.py"), "--base-url", f"http://127.0.0.1:{port}",
               "--tokenizer", os.path.join(PEERS, "models", "smollm2-hf", "tokenizer.json"),
               "-n", str(requests), "-c", str(concurrency), "--seed", str(seed), "--ignore-eos",
               "--label", f"{name} c={concurrency}", "--out", out, *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.exists(out):
        raise SystemExit(f"loadgen failed against {name}: {done.stderr[-2000:]}")
    with open(out) as f:
        record = json.loads(f.read().strip().splitlines()[-1])
    os.remove(out)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--who", nargs="+", default=["jaxserve", "vllm"], choices=sorted(servers()))
    ap.add_argument("--matrix", default="1:8,8:32,32:64", help="concurrency:requests list")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loadgen-args", default="", help="more loadgen.py arguments (one string)")
    ap.add_argument("--out", default=None, help="directory for the JSON records and server logs")
    ap.add_argument("--no-pause", dest="pause", action="store_false",
                    help="leave the other servers running (not paused) during each run")
    args = ap.parse_args()
    matrix = [tuple(map(int, item.split(":"))) for item in args.matrix.split(",")]
    out_dir = args.out or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"interleaved-{int(time.time())}")
    os.makedirs(out_dir, exist_ok=True)
    records = open(os.path.join(out_dir, "records.jsonl"), "a")
    specs = servers()
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in args.who:  # one at a time: start-up is measured alone
            procs[name], meta = start(name, specs[name], out_dir)
            time.sleep(5)
            idle = tree_stats(procs[name].pid)
            meta["idle_rss_mib"] = idle["rss_mib"]
            records.write(json.dumps(meta) + "\n")
            print(f"{name}: healthy after {meta['startup_s']} s, idle RSS {idle['rss_mib']} MiB", flush=True)
        results: dict[tuple[int, int, str], dict] = {}
        for round_index in range(args.rounds):
            order = args.who if round_index % 2 == 0 else args.who[::-1]
            for concurrency, requests in matrix:
                seed = 1000 * concurrency + requests + 100000 * round_index  # fresh prompts, the same for all
                for name in order:
                    for other, proc in procs.items():
                        pause(proc, args.pause and other != name)
                    others = {other: tree_stats(procs[other].pid) for other in procs if other != name}
                    began = time.perf_counter()
                    record = load_run(name, specs[name]["port"], concurrency, requests, seed,
                                      args.loadgen_args.split(), out_dir)
                    wall = time.perf_counter() - began
                    idle_cpu = {other: round((tree_stats(procs[other].pid)["cpu_s"] - before["cpu_s"]) / wall, 3)
                                for other, before in others.items()}  # cores the others used meanwhile
                    record.update({"record": "load", "server": name, "round": round_index, "seed": seed,
                                   "idle_servers_cores_busy": idle_cpu})
                    records.write(json.dumps(record) + "\n")
                    records.flush()
                    results[(round_index, concurrency, name)] = record
                    print(f"round {round_index} c={concurrency:<3d} {name:16s} "
                          f"{record['output_tok_per_s']:8.1f} tok/s  TTFT p50 {record['ttft_ms']['p50']:7.0f} ms"
                          f"  failed {record['failed']}  (others busy {idle_cpu})", flush=True)
    finally:
        for proc in procs.values():
            pause(proc, False)
            stop(proc)
    first, rest = args.who[0], args.who[1:]
    for other in rest:
        print(f"\n{first} / {other}, output tokens/s, per round:")
        for concurrency, _ in matrix:
            tokens_per_s = lambda r, who: results[(r, concurrency, who)]["output_tok_per_s"]
            ratios = [tokens_per_s(r, first) / tokens_per_s(r, other) for r in range(args.rounds)]
            print(f"  c={concurrency:<3d} " + "  ".join(f"{x:.2f}x" for x in ratios)
                  + f"   median {statistics.median(ratios):.2f}x")
    print(f"records: {os.path.join(out_dir, 'records.jsonl')}")


if __name__ == "__main__":
    main()
