#!/usr/bin/env bash
# The GPU session in one command: GPU tests, then the benchmarks, logs and JSON under $OUT.
#   bash benchmarks/gpu_suite.sh [tests|head|tpot|export|all]...   (default: all)
# Each step has its own time limit so one slow step cannot eat the whole call.
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=${*:-all}
want() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
if want tests; then
  timeout 420 python3 -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
fi
if want head; then
  timeout 300 python3 -m benchmarks.head_latency ${HEAD_ARGS:-} --out "$OUT/head_latency.json" 2>&1 | tail -60 | tee "$OUT/head_latency.log"
fi
if want tpot; then
  timeout 480 python3 -m benchmarks.tpot ${TPOT_ARGS:-} --out "$OUT/tpot.json" 2>&1 | tail -40 | tee "$OUT/tpot.log"
fi
if want export; then
  timeout 300 python3 -m benchmarks.export_times ${EXPORT_ARGS:-} --out "$OUT/export_times.json" 2>&1 | tail -30 | tee "$OUT/export_times.log"
fi
