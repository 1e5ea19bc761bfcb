#!/bin/bash
# The whole engine and server on a GPU (see README.md here). Logs and JSON land in $OUT (all.tgz).
# Stages have their own time limits so that one hang cannot eat the lease.
set -u
cd "$(dirname "$0")/../.."
RESULT=${OUT:-/tmp/gpu_out}; mkdir -p "$RESULT"
OUT=/tmp/gpu_logs; rm -rf $OUT; mkdir -p $OUT   # many files: packed into $RESULT/all.tgz at each stage
START=$(date +%s)
say() {
  echo "[t+$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"
  cp "$OUT/summary.txt" "$RESULT/"; tar czf "$RESULT/all.tgz" -C $OUT .
}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
PY=${PY:-python3}
SMALL=${SMALL:-0}   # SMALL=1: tiny shapes, for a dry run on the CPU
STAGES=${STAGES:-"parity serve offline"}   # also: async (the server and offline steps with async scheduling off)
MODELS=${MODELS:-"llama1b smol"}            # the offline stage's models
want() { [[ " $STAGES " == *" $1 "* ]]; }

say "install"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/jx . \
  > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/jx:/tmp/site
nvidia-smi -L 2>/dev/null | tee -a "$OUT/summary.txt"
$PY -c "import jax, flax, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'transformers',
transformers.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$OUT/summary.txt"

say "random checkpoints"
$PY - <<EOF || exit 1
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from random_checkpoint import write_random_llama
tok = Path('.gpu/tokenizer')
if $SMALL:
    write_random_llama(Path('/tmp/smol'), tok, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128)
    write_random_llama(Path('/tmp/llama1b'), tok, layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256)
else:  # SmolLM2-135M's shapes, then Llama-3.2-1B's (with SmolLM2's vocabulary)
    # std 0.02 (HF's init): deep random models with larger weights amplify rounding noise past any parity check
    write_random_llama(Path('/tmp/smol'), tok, layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536,
                       max_positions=8192, std=0.02)
    if "offline" in "$STAGES".split() and "llama1b" in "$MODELS".split():
        write_random_llama(Path('/tmp/llama1b'), tok, layers=16, hidden=2048, heads=32, kv_heads=8,
                           intermediate=8192, max_positions=8192, tied=False, std=0.02)
EOF
BATCHES="1 16 64 256"; [ "$SMALL" = 1 ] && BATCHES="1 4"

if want parity; then
say "parity: pallas vs xla attention in the engine (smol, float32)"
timeout 150 $PY benchmarks/backend_parity.py --model /tmp/smol --save "$OUT/parity.json" 2>&1 \
  | grep -E "^\{|greedy|Error|error" | tail -12 | tee -a "$OUT/summary.txt"
fi


serve() {  # $1: log name, then extra flags; sets SERVER_PID and UP_S (seconds to /health)
  local name=$1; shift
  /tmp/jx/bin/jaxserve serve --model /tmp/smol --port 8000 --max-num-seqs 256 --max-num-batched-tokens 2048 \
    --gpu-memory-utilization 0.5 --disable-log-requests "$@" > "$OUT/$name.log" 2>&1 &
  SERVER_PID=$!
  local t0=$(date +%s.%N)
  for i in $(seq 1 480); do
    curl -sf http://127.0.0.1:8000/health > /dev/null && break
    kill -0 $SERVER_PID 2>/dev/null || { say "server died"; tail -20 "$OUT/$name.log"; return 1; }
    sleep 0.5
  done
  UP_S=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
}

bench_matrix() {  # $1: a tag for the logs; concurrency 1, 32 and 256 against the running server
  for c in 1 32 256; do
    n=$(( c == 1 ? 8 : 2 * c ))
    timeout 120 /tmp/jx/bin/jaxserve bench --base-url http://127.0.0.1:8000 --ignore-eos --prompt-len 128 \
      --output-len 128 --concurrency $c --num-requests $n --warmup 1 --tokenizer .gpu/tokenizer \
      --json-out "$OUT/bench_$1_c$c.json" > "$OUT/bench_$1_c$c.log" 2>&1
    say "bench $1 c=$c rc=$?"; grep -E "failed|output_tok_per_s|ttft_ms|tpot_ms" "$OUT/bench_$1_c$c.log" \
      | tee -a "$OUT/summary.txt"
  done
}

if want serve; then
say "server cold start (smol)"
serve serve_cold && say "to /health: $UP_S s"
bench_matrix default
kill $SERVER_PID; wait $SERVER_PID 2>/dev/null
say "server warm start"
serve serve_warm && say "to /health: $UP_S s"
timeout 60 /tmp/jx/bin/jaxserve bench --base-url http://127.0.0.1:8000 --ignore-eos --prompt-len 128 \
  --output-len 32 --concurrency 4 --num-requests 8 --tokenizer .gpu/tokenizer > "$OUT/bench_warm.log" 2>&1
say "warm bench rc=$?"; grep -E "failed|output_tok_per_s" "$OUT/bench_warm.log" | tee -a "$OUT/summary.txt"
kill $SERVER_PID; wait $SERVER_PID 2>/dev/null
fi
if want async; then  # the same matrix one step at a time, then async again (the machine drifts)
  for mode in no-async async; do
    say "server --$mode-scheduling"
    serve serve_$mode --$mode-scheduling && say "to /health: $UP_S s" && bench_matrix $mode
    kill $SERVER_PID; wait $SERVER_PID 2>/dev/null
  done
fi
MODES=${MODES:-default}; want async && MODES="async no-async"
want offline && for m in $MODELS; do
  for mode in $MODES; do  # greedy tokens without drafts, so that both modes decode one token a step
    flags=""; [ $mode != default ] && flags="--$mode-scheduling --num-speculative-tokens 0"
    say "offline decode: $m $mode"
    timeout 170 $PY benchmarks/throughput.py --model /tmp/$m --dtype bfloat16 --batches $BATCHES $flags \
      --json-out "$OUT/throughput_${m}_$mode.json" --tokens-out "$OUT/tokens_${m}_$mode.json" \
      > "$OUT/throughput_${m}_$mode.log" 2>&1
    say "rc=$?"; grep -E "^\||prefill" "$OUT/throughput_${m}_$mode.log" | tee -a "$OUT/summary.txt"
  done
done
if want offline && [[ " $MODES " == *" no-async "* ]]; then
  for m in $MODELS; do
    $PY -c "import json; a, b = (json.load(open(f'$OUT/tokens_${m}_{x}.json')) for x in ('async', 'no-async')); \
same = sum(a[k] == b.get(k) for k in a); print(f'$m: async and one-at-a-time tokens agree on {same}/{len(a)} requests')" \
      2>&1 | tee -a "$OUT/summary.txt"
  done
fi
say "done"
