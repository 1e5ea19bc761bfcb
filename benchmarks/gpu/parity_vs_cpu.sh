#!/bin/bash
# Both GPU attention paths against the CPU, float32, inside the engine (see README.md here).
# A well-conditioned random SmolLM2-shaped model (std 0.02); CPU (float32, exact dots) as the reference.
set -u
cd "$(dirname "$0")/../.."
RESULT=${OUT:-/tmp/gpu_out}; mkdir -p "$RESULT"
OUT=/tmp/gpu_logs; rm -rf $OUT; mkdir -p $OUT
START=$(date +%s)
say() { echo "[t+$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; cp $OUT/* "$RESULT/" 2>/dev/null; }
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
PY=${PY:-python3}
L=${L:-30}; H=${H:-576}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/jx . > /dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/jx:/tmp/site
$PY - <<PYEOF || exit 1
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from random_checkpoint import write_random_llama
write_random_llama(Path('/tmp/smol02'), Path('.gpu/tokenizer'), layers=$L, hidden=$H, heads=9, kv_heads=3,
                   intermediate=1536, max_positions=8192, std=0.02)
PYEOF
say "checkpoint written"
P="benchmarks/backend_parity.py --model /tmp/smol02"
JAX_PLATFORMS=cpu timeout 200 $PY $P --backends xla --save $OUT/cpu.json > $OUT/cpu.log 2>&1 &
CPU_PID=$!
timeout 150 $PY $P --save $OUT/gpu_default.json > $OUT/gpu_default.log 2>&1
say "gpu default precision rc=$?"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 $PY $P --save $OUT/gpu_highest.json > $OUT/gpu_highest.log 2>&1
say "gpu highest precision rc=$?"
wait $CPU_PID; say "cpu rc=$?"
for f in gpu_default gpu_highest; do
  $PY $P --reference $OUT/cpu.json --compare $OUT/$f.json 2>&1 | grep -E "vs" | tee -a $OUT/summary.txt
done
grep -E "vs" $OUT/gpu_default.log $OUT/gpu_highest.log | tee -a $OUT/summary.txt
say done
