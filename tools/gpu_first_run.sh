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
# Steps, in the order of what they tell a first run (every limit is a cap; what a step leaves unused
# goes to the later ones, and the benchmarks, last, run only with time left):
#   build 150 s                 the extension with CUDA for sm_90
#   backends 10 s               which kernels are live
#   smoke 100 s                 tools/gpu_smoke.py --size full: every op family on the shapes the CPU
#                               suite never reaches, on every backend (one process each, 50 s at
#                               most), a side stream, sync-free; gpu_smoke_cuda_full.json lands in $OUT
#   bad_input_<family> 4x20 s   a bad-input probe of the CUDA C++ ops, one process per op family (a
#                               crash there kills only its probe)
#   gpu_tests 120 s             every gpu-marked test with compiled Triton (TRITON_INTERPRET=0, TF32
#                               off by tests/conftest.py); gpu_tests_failed_again 30 s: the failures, -vv
#   memcheck_smoke 45 s         gpu_smoke.py --size small under compute-sanitizer memcheck (C++ and
#                               Triton kernels; the caching allocator off, so an overrun is seen)
#   racecheck_cpp 40 s          the same, C++ backend only, racecheck on the csrc/cuda kernels only
#   racecheck_triton 30 s       the same, Triton backend only, racecheck on the compiled Triton kernels
#   memcheck 40 s               the group-lasso tests (odd and zero sizes) under memcheck
#   bench_group_lasso 40 s, bench_channel_union 40 s, bench_energy 60 s  (--device cuda; JSON in
#                               bench/results/ and $OUT; energy reads NVML only)
# The sanitizer steps are skipped after the first one finds compute-sanitizer refusing the device
# (gVisor machines do). Compared with issue 21's script: build -30, backends -20, each bad-input
# probe -20, gpu_tests -50, its rerun -30, memcheck -20, benchmarks -20/-20/-30, for the four new
# steps (215 s of caps; the caps up to gpu_tests add up to 460 s).
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
  for f in bench/bench_group_lasso.py bench/bench_channel_union.py bench/bench_energy.py tests/test_group_lasso_ops.py \
           tools/gpu_smoke.py tests/test_gpu_blind_spots.py; do
    [ -f "$f" ] || { echo "gpu_first_run: $f is missing" >&2; exit 1; }
  done
  # the smoke parses its arguments before it imports torch: --help needs no GPU and no torch
  "$PY" tools/gpu_smoke.py --help > /dev/null || { echo "gpu_first_run: tools/gpu_smoke.py --help failed" >&2; exit 1; }
else
  { nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw --format=csv;
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  } > "$LOGS/device.txt" 2>&1
  cat "$LOGS/device.txt" >> "$SUMMARY"
fi

step build 150 env USE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install --no-build-isolation --no-deps -v .
step backends 10 "$PY" -c "import pyoptim, json; print(json.dumps(pyoptim.backends()))"
step smoke 100 env TRITON_INTERPRET=0 "$PY" tools/gpu_smoke.py --size full --device cuda --isolate --child-timeout 50 \
  --out "$OUT"
for fam in group_lasso_ops sparse_update_ops channel_union_conv channel_compact; do
  step "bad_input_$fam" 20 env TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider \
    "tests/test_$fam.py" -k "bad_input and cuda-cpp"
done
step gpu_tests 120 env TRITON_INTERPRET=0 "$PY" -m pytest -q -m gpu -n 8 --junitxml="$OUT/gpu_tests.xml" tests
step gpu_tests_failed_again 30 env TRITON_INTERPRET=0 "$PY" -m pytest -q -m gpu --lf --last-failed-no-failures none -x -vv tests

# compute-sanitizer: the smoke at its small size (every op once, the wide and tiled cases); its JSON
# goes into the logs ($OUT brings back 8 files). Racecheck looks at our kernels only (the csrc/cuda
# ones live in namespace pyoptim, the Triton ones are named _gl_*, _cc_*, _bn_*, ...) where this
# sanitizer takes the filter options (probed first), else at every kernel of the process.
SAN=(compute-sanitizer --error-exitcode 3 --print-limit 50)
SMOKE_SMALL=("$PY" tools/gpu_smoke.py --size small --device cuda --cases gl_tilings,bn_mean1e3,compact_wide,side_stream)
CPP_KERNELS=(--kernel-name kns=pyoptim)
TRITON_KERNELS=(--kernel-regex "kns=^_(gl|cc|bn|conv|dw|linear|split)_")
if [ "$DRY" != 1 ]; then
  compute-sanitizer "${CPP_KERNELS[@]}" true > /dev/null 2>&1 || CPP_KERNELS=()
  compute-sanitizer "${TRITON_KERNELS[@]}" true > /dev/null 2>&1 || TRITON_KERNELS=()
  echo "racecheck filters: C++ '${CPP_KERNELS[*]:-none (every kernel)}', Triton '${TRITON_KERNELS[*]:-none (every kernel)}'" |
    tee -a "$SUMMARY"
fi
SAN_REFUSED=0
# san_step NAME SECONDS CMD...: a step, skipped once a sanitizer step found the device refused
san_step() {
  local name=$1
  if [ "$SAN_REFUSED" = 1 ]; then echo "$name: skipped (compute-sanitizer refused the device)" | tee -a "$SUMMARY"; return 0; fi
  step "$@"
  if [ "$DRY" != 1 ] && grep -q "Device not supported" "$LOGS/$name.log" 2>/dev/null; then SAN_REFUSED=1; fi
  return 0
}
san_step memcheck_smoke 45 env TRITON_INTERPRET=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SAN[@]}" --tool memcheck \
  "${SMOKE_SMALL[@]}" --backends cpp,triton --out "$LOGS/memcheck_smoke"
san_step racecheck_cpp 40 env TRITON_INTERPRET=0 "${SAN[@]}" --tool racecheck "${CPP_KERNELS[@]}" \
  "${SMOKE_SMALL[@]}" --backends cpp --out "$LOGS/racecheck_cpp"
san_step racecheck_triton 30 env TRITON_INTERPRET=0 "${SAN[@]}" --tool racecheck "${TRITON_KERNELS[@]}" \
  "${SMOKE_SMALL[@]}" --backends triton --out "$LOGS/racecheck_triton"
san_step memcheck 40 env TRITON_INTERPRET=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SAN[@]}" --tool memcheck \
  "$PY" -m pytest -q -x -m gpu -p no:cacheprovider tests/test_group_lasso_ops.py -k "cuda-cpp and not bad_input"
step bench_group_lasso 40 "$PY" bench/bench_group_lasso.py --device cuda
step bench_channel_union 40 "$PY" bench/bench_channel_union.py --device cuda
# energy (issue 21): the GPU's roofline and layer profiles, and the meter read only (NVML's energy
# counter, if pynvml is installed there); never sets a clock
step bench_energy 60 "$PY" bench/bench_energy.py --device cuda --models resnet50,vgg16 --reps 3 \
  --batch-factor 2 --sections measured,meter
if [ "$DRY" != 1 ]; then
  cp bench/results/group_lasso_cuda*.json bench/results/channel_union_cuda*.json bench/results/energy_cuda*.json \
    "$OUT/" 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$LOGS" .
fi
rm -rf "$LOGS"
echo "gpu_first_run: done in $(( $(date +%s) - T0 )) s; summary in $SUMMARY" | tee -a "$SUMMARY"
