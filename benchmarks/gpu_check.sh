#!/usr/bin/env bash
# The GPU path, run for real (issue 19): every check that needs a CUDA machine, in one script of at
# most ~9 minutes, each step under its own time limit so one failure or hang does not lose the rest.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--result-dir DIR] [--wheels DIR]
#
# Steps, in order of value (limits in seconds; DRY: the --dry-run value):
#   1 tests       pytest -m gpu tests/gpu: Triton kernels vs references (bf16, fp16), CUDA-graph replay
#                 vs eager, LoRA (eager: graphs are off with LoRA), the engine vs transformers (140)
#   2 decode      decode step time, Llama-3.1-8B shape, random bf16 weights, vs the roofline (95)
#   3 throughput  ShareGPT-like lengths: pageant (70), transformers generate (80), transformers'
#                 continuous batching (50)
#   4 serve       pageant serve + pageant bench serve at 3 request rates: TTFT/TPOT (90)
# (525 s of limits, ~15 s of set-up and summary: 9 minutes at most, less when steps end early)
# then the summary: the goals, one screen of text.
#
# Results: DIR, else $OUT (the device tool's folder), else benchmarks/results/gpu-check-<UTC time>
# (a temporary folder for --dry-run). At most 8 files, all at its top (what the device tool brings
# back): step1_tests.json step2_decode.json step3_throughput.json step4_serve.json gpu_check.json
# summary.txt gpu_check.png gpu_check.log. Every JSON starts with the same header (device, driver,
# torch/triton/transformers versions, date, git commit: $PAGEANT_COMMIT, else `git rev-parse HEAD`).
#
# The GPU image has torch, triton, transformers, pytest and httpx but no fastapi/uvicorn/pydantic:
# the wheels that benchmarks/gpu_wheels.sh downloads (--wheels, default .whl/gpu_check) are
# installed into a temporary folder with --no-index --no-deps, only those absent or older here.
# Pageant itself is not installed there: a temporary folder of links maps pageant.engine/kernels/
# operator onto this checkout, and every Python process runs outside the checkout (its pageant/
# folder would shadow the links). --dry-run: every step on the CPU with tiny shapes (the gpu tests
# in Triton's interpreter, first parametrization of each), in well under a minute.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY=0
RESULT=""
WHEELS="$ROOT/.whl/gpu_check"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --result-dir) RESULT="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
if [ -z "$RESULT" ]; then
  if [ -n "${OUT:-}" ]; then RESULT="$OUT"
  elif [ "$DRY" = 1 ]; then RESULT="${TMPDIR:-/tmp}/gpu-check-dry-$STAMP"
  else RESULT="$ROOT/benchmarks/results/gpu-check-$STAMP"; fi
fi
mkdir -p "$RESULT" && RESULT="$(cd "$RESULT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOG="$RESULT/gpu_check.log"
: >"$LOG"
STATUS="$WORK/status"
say() { echo "gpu_check: $*" | tee -a "$LOG"; }

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 PAGEANT_GPU_TESTS_ON_CPU=1
  LIMITS=(tests=60 decode=60 throughput_pageant=60 throughput_hf=60 throughput_hf_cb=60 serve=60)
else
  export TRITON_INTERPRET=0 PAGEANT_GPU_TESTS_ON_CPU=0
  LIMITS=(tests=140 decode=95 throughput_pageant=70 throughput_hf=80 throughput_hf_cb=50 serve=90)
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error
limit() { local kv; for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }
if [ -z "${PAGEANT_COMMIT:-}" ]; then
  PAGEANT_COMMIT="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  if [ "$PAGEANT_COMMIT" != unknown ] && [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null | head -1)" ]; then
    PAGEANT_COMMIT="$PAGEANT_COMMIT+dirty"
  fi
fi
export PAGEANT_COMMIT
cd "$WORK" || exit 1  # never in the checkout: its pageant/ folder would shadow the package

# Pageant, importable as installed: a folder of links unless this checkout is installed already.
if ! "$PY" -c 'import sys, pageant.engine as e; sys.exit(not e.__file__.startswith(sys.argv[1]))' "$ROOT/" 2>/dev/null; then
  mkdir -p "$WORK/pkg/pageant"
  for f in "$ROOT"/pageant/*.py; do ln -s "$f" "$WORK/pkg/pageant/"; done
  for sub in engine kernels operator; do ln -s "$ROOT/$sub" "$WORK/pkg/pageant/$sub"; done
  export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
  say "pageant from $ROOT through links in $WORK/pkg"
fi
# The server's packages, from the carried wheels when this machine lacks them.
if ! "$PY" -c 'import fastapi, uvicorn, pydantic, prometheus_client, httpx' 2>/dev/null; then
  if [ -d "$WHEELS" ]; then
    mapfile -t need < <("$PY" "$ROOT/benchmarks/gpu_check.py" wheels "$WHEELS")
    if [ "${#need[@]}" -gt 0 ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$WORK/site" "${need[@]}" 2>&1 | tee -a "$LOG"; then
      export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
      say "installed ${#need[@]} wheels from $WHEELS"
    fi
  else
    say "fastapi/uvicorn missing and no wheels at $WHEELS (bash benchmarks/gpu_wheels.sh): step 4 will fail"
  fi
fi
"$PY" "$ROOT/benchmarks/gpu_check.py" header $([ "$DRY" = 1 ] && echo --dry-run) 2>&1 | tee -a "$LOG"

# run_step NAME COMMAND...: under `timeout` (the step's limit), output to the log, status recorded.
run_step() {
  local name="$1" t rc start
  shift
  t="$(limit "$name")"
  say "step $name (limit ${t}s): $*"
  start=$SECONDS
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "$name $rc $((SECONDS - start)) $t" >>"$STATUS"
  say "step $name: rc $rc after $((SECONDS - start))s"
}
DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
DRIVE=("$PY" "$ROOT/benchmarks/gpu_check.py")
COMMON=(--result-dir "$RESULT" "${DRYFLAG[@]}")

# 1: the gpu tests (one JSON line per outcome while they run, so a timeout keeps what passed)
export PAGEANT_GPU_TESTS_REPORT="$WORK/tests.jsonl"
: >"$PAGEANT_GPU_TESTS_REPORT"
PYTEST=("$PY" -m pytest -m gpu -q -rfEs --rootdir "$ROOT" -c "$ROOT/pyproject.toml")
"$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST+=(--timeout 100)  # a hung test fails alone
# 4 workers on the GPU: most of this step is Triton compiling (CPU-bound), the GPU work is small
[ "$DRY" = 0 ] && "$PY" -c 'import xdist' 2>/dev/null && PYTEST+=(-n 4)
run_step tests "${PYTEST[@]}" "$ROOT"/tests/gpu/test_kernels_cuda.py "$ROOT"/tests/gpu/test_cuda_graphs.py \
  "$ROOT"/tests/gpu/test_engine_vs_hf.py
"${DRIVE[@]}" tests "${COMMON[@]}" --report "$PAGEANT_GPU_TESTS_REPORT" \
  --rc "$(tail -1 "$STATUS" | cut -d' ' -f2)" 2>&1 | tee -a "$LOG"
unset PAGEANT_GPU_TESTS_REPORT
# 2-4: each Python step stops itself 10 s before its limit, keeping what it measured
run_step decode "${DRIVE[@]}" decode "${COMMON[@]}" --time-limit "$(( $(limit decode) - 10 ))"
for side in pageant hf hf_cb; do
  run_step "throughput_$side" "${DRIVE[@]}" throughput --side "$side" "${COMMON[@]}" \
    --time-limit "$(( $(limit "throughput_$side") - 10 ))"
done
run_step serve "${DRIVE[@]}" serve "${COMMON[@]}" --time-limit "$(( $(limit serve) - 10 ))"
# the summary: goals, gpu_check.json, summary.txt, gpu_check.png (printed last: one screen)
"${DRIVE[@]}" summary "${COMMON[@]}" --status "$STATUS" >"$WORK/summary.out" 2>&1
cat "$WORK/summary.out" >>"$LOG"
echo "results in $RESULT:" $(cd "$RESULT" && ls) >>"$LOG"
[ "$(stat -c %s "$LOG")" -gt 15000000 ] && tail -c 15000000 "$LOG" >"$WORK/log" && mv "$WORK/log" "$LOG"
echo
cat "$WORK/summary.out"
echo "results in $RESULT"
