#!/usr/bin/env bash
# The first command a session with a GPU runs (device tool: `run`, from the repository root).
# At most ~8 minutes in all: every step has its own timeout, cut further to what is left of the
# total (GPU_RUN_BUDGET_S, default 470 s). Logs and results go to $OUT (the device tool brings
# them back; default ./gpu_run_out). Commit what it measured under bench/results/ with the device
# named. It never changes clocks, power limits or modes.
#
#   bash tools/gpu_first_run.sh            # on the GPU machine
#   GPU_FIRST_RUN_DRY=1 bash tools/gpu_first_run.sh   # on a CPU machine: checks the steps parse and
#                                                     # that the tools exist; runs nothing heavy
#
# Steps: 1 build with CUDA for sm_90; 2 a bad-input probe of the CUDA C++ ops, one process per op
# family (a crash there kills only its probe); 3 every gpu-marked test with compiled Triton
# (TRITON_INTERPRET=0, TF32 off by tests/conftest.py), then the failures again, verbose; 4 the
# group-lasso tests under compute-sanitizer memcheck; 5 the group-lasso, channel-union and energy
# benchmarks with --device cuda (their JSON lands in bench/results/ and $OUT; energy reads NVML only).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_run_out}
LOGS=$(mktemp -d)      # one log a step, packed into $OUT/logs.tgz at the end ($OUT brings back 8 files)
mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET=${GPU_RUN_BUDGET_S:-470}
DRY=${GPU_FIRST_RUN_DRY:-0}
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# step NAME SECONDS CMD...: runs CMD with a timeout of min(SECONDS, time left), logs to $OUT/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 10 ]; then echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY" = 1 ]; then echo "$name: (dry) timeout $limit $*" | tee -a "$SUMMARY"; return 0; fi
  local t=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc in $(( $(date +%s) - t )) s (limit $limit s); $(tail -n 1 "$LOGS/$name.log" | cut -c1-160)" | tee -a "$SUMMARY"
  return 0
}

if [ "$DRY" = 1 ]; then
  for f in bench/bench_group_lasso.py bench/bench_channel_union.py bench/bench_energy.py tests/test_group_lasso_ops.py; do
    [ -f "$f" ] || { echo "gpu_first_run: $f is missing" >&2; exit 1; }
  done
else
  { nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw --format=csv;
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  } > "$LOGS/device.txt" 2>&1
  cat "$LOGS/device.txt" >> "$SUMMARY"
fi

step build 180 env USE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install --no-build-isolation --no-deps -v .
step backends 30 "$PY" -c "import pyoptim, json; print(json.dumps(pyoptim.backends()))"
for fam in group_lasso_ops sparse_update_ops channel_union_conv channel_compact; do
  step "bad_input_$fam" 40 env TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider \
    "tests/test_$fam.py" -k "bad_input and cuda-cpp"
done
step gpu_tests 170 env TRITON_INTERPRET=0 "$PY" -m pytest -q -m gpu -n 8 --junitxml="$OUT/gpu_tests.xml" tests
step gpu_tests_failed_again 60 env TRITON_INTERPRET=0 "$PY" -m pytest -q -m gpu --lf --last-failed-no-failures none -x -vv tests
step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 3 env TRITON_INTERPRET=0 "$PY" -m pytest -q -x \
  -m gpu -p no:cacheprovider tests/test_group_lasso_ops.py -k "cuda-cpp and not bad_input"
step bench_group_lasso 60 "$PY" bench/bench_group_lasso.py --device cuda
step bench_channel_union 60 "$PY" bench/bench_channel_union.py --device cuda
# energy (issue 21): the GPU's roofline and layer profiles, and the meter read only (NVML's energy
# counter, if pynvml is installed there); never sets a clock
step bench_energy 90 "$PY" bench/bench_energy.py --device cuda --models resnet50,vgg16 --reps 3 \
  --batch-factor 2 --sections measured,meter
if [ "$DRY" != 1 ]; then
  cp bench/results/group_lasso_cuda*.json bench/results/channel_union_cuda*.json bench/results/energy_cuda*.json \
    "$OUT/" 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$LOGS" .
fi
rm -rf "$LOGS"
echo "gpu_first_run: done in $(( $(date +%s) - T0 )) s; summary in $SUMMARY" | tee -a "$SUMMARY"
