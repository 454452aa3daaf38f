#!/usr/bin/env bash
# The GPU session in one command: GPU tests, then the benchmarks, logs and JSON under $OUT.
#   bash benchmarks/gpu_suite.sh [tests|sweep|pdl|attn|head|tpot|gemma|export|all]...  (default: all)
# Each step has its own time limit (seconds, env T_<STEP>) so one slow step cannot eat the call;
# extra arguments per step come from env <STEP>_ARGS (e.g. TPOT_ARGS="--batch 1").
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=${*:-all}
want() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
step() {  # step NAME LIMIT_S LOG COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
  tail -n "${TAIL:-25}" "$OUT/$log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
if want tests; then
  step tests "${T_TESTS:-420}" gpu_tests.log python3 -m pytest -q -m cuda -p no:cacheprovider \
    ${TESTS_ARGS:-}
fi
if want sweep; then
  step sweep "${T_SWEEP:-240}" gemv_sweep.log python3 -m benchmarks.gemv_sweep ${SWEEP_ARGS:-} \
    --out "$OUT/gemv_sweep.json"
fi
if want pdl; then
  step pdl "${T_PDL:-120}" pdl_chain.log python3 -m benchmarks.pdl_chain ${PDL_ARGS:-} \
    --out "$OUT/pdl_chain.json"
fi
if want attn; then
  step attn "${T_ATTN:-180}" attention_latency.log python3 -m benchmarks.attention_latency \
    ${ATTN_ARGS:-} --out "$OUT/attention_latency.json"
fi
if want head; then
  step head "${T_HEAD:-300}" head_latency.log python3 -m benchmarks.head_latency ${HEAD_ARGS:-} \
    --out "$OUT/head_latency.json"
fi
if want tpot; then
  step tpot "${T_TPOT:-480}" tpot.log python3 -m benchmarks.tpot ${TPOT_ARGS:-} \
    --out "$OUT/tpot.json"
fi
if want gemma; then
  step gemma "${T_GEMMA:-300}" tpot_gemma.log python3 -m benchmarks.tpot --arch gemma3-270m \
    ${GEMMA_ARGS:-} --out "$OUT/tpot_gemma.json"
fi
if want export; then
  step export "${T_EXPORT:-300}" export_times.log python3 -m benchmarks.export_times \
    ${EXPORT_ARGS:-} --out "$OUT/export_times.json"
fi
