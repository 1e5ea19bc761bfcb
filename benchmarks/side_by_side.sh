#!/usr/bin/env bash
# jaxserve (this checkout's .venv) and the peers, one after another in one run, on the shared bench's load
# generator: 128-token prompts, 128 output tokens (ignore_eos), streamed completions, MATRIX (default
# 1:8,32:64 = concurrency 1 with 8 requests, 32 with 64). Peers live under $PEERS (../shared/bench/setup_peers.sh).
#   bash benchmarks/side_by_side.sh                       # jaxserve, llama-server -np 8 and -np 32, vLLM
#   WHO="jaxserve llama-np8" OUT=/tmp/run bash benchmarks/side_by_side.sh
#   WHO="jaxserve jaxserve-nospec" ...                     # jaxserve without prompt-lookup speculation
#   LOADGEN_EXTRA='--temperature 0.8 --extra-body {"top_p":0.95}' bash ...   # sampled instead of greedy (no spaces
#                                                                             # inside the JSON: the args are split)
set -u
proj=$(cd "$(dirname "$0")/.." && pwd)
bench=${BENCH:-$proj/../shared/bench}
P=${PEERS:-${TMPDIR:-/tmp}/peers}
MATRIX=${MATRIX:-1:8,32:64}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
echo "results in $out"
gguf=$P/models/SmolLM2-135M-Instruct.Q4_1.gguf
B=("$P/bench/bin/python" "$bench/bench_peer.py" --tokenizer "$P/models/smollm2-hf/tokenizer.json" --matrix "$MATRIX"
   "--loadgen-args=--ignore-eos${LOADGEN_EXTRA:+ $LOADGEN_EXTRA}")
for who in ${WHO:-jaxserve llama-np8 llama-np32 vllm}; do
  case $who in
    jaxserve) "${B[@]}" --name jaxserve --port 8110 --health /health --out "$out/jaxserve.jsonl" --env JAX_PLATFORMS=cpu -- \
        "$proj/.venv/bin/jaxserve" --host 127.0.0.1 --port 8110 >/dev/null 2>&1 ;;
    jaxserve-nospec) "${B[@]}" --name jaxserve-nospec --port 8110 --health /health --out "$out/jaxserve-nospec.jsonl" \
        --env JAX_PLATFORMS=cpu -- "$proj/.venv/bin/jaxserve" --host 127.0.0.1 --port 8110 \
        --num-speculative-tokens 0 >/dev/null 2>&1 ;;
    llama-np*) "${B[@]}" --name "$who" --port 8104 --health /health --out "$out/$who.jsonl" -- \
        "$P/src/llama.cpp/build/bin/llama-server" -m "$gguf" --host 127.0.0.1 --port 8104 -t 2 -tb 2 \
        -np "${who#llama-np}" -c 16384 --kv-unified -cb --no-webui >/dev/null 2>&1 ;;
    vllm) "${B[@]}" --name vllm-bind01 --port 8102 --health /health --out "$out/vllm.jsonl" \
        --env VLLM_CPU_KVCACHE_SPACE=4 --env VLLM_CPU_OMP_THREADS_BIND=0-1 -- \
        "$P/vllm/bin/python" -m vllm.entrypoints.openai.api_server --model "$P/models/smollm2-hf" \
        --host 127.0.0.1 --port 8102 --dtype bfloat16 --max-model-len 2048 >/dev/null 2>&1 ;;
    *) echo "unknown server $who"; exit 2 ;;
  esac
done
python3 - "$out" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.jsonl"))):
    name = os.path.basename(path)[:-len(".jsonl")]
    for line in open(path):
        r = json.loads(line)
        if r.get("record") == "server":
            print(f"{name:12s} start-up {r.get('startup_s')} s, idle RSS {r.get('idle_rss_mib')} MiB")
        elif "concurrency" in r:
            print(f"{name:12s} c={r['concurrency']:<3d} {r['output_tok_per_s']:7.1f} tok/s  TTFT p50 "
                  f"{r['ttft_ms']['p50']:8.0f} ms  TPOT p50 {r['tpot_ms']['p50']:6.1f} ms  failed {r['failed']}")
PY
