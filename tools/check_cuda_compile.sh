#!/usr/bin/env bash
# Compile-only check of every CUDA source with the machine's nvcc, against the installed torch's
# headers (a CPU wheel ships the ATen/c10 CUDA headers). CUDA code that does not compile fails CI
# even on machines without a GPU. Nothing is linked or run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found (set NVCC=...); cannot check csrc/cuda/*.cu" >&2
  exit 1
fi
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as e; print(' '.join('-I'+p for p in e.include_paths()))")
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
# A CPU wheel lacks one header that a CUDA build of torch generates; stand in for it.
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$SHIM/c10/cuda/impl/cuda_cmake_macros.h"
ARCHS=${CUDA_CHECK_ARCHS:-"80 90"}
GENCODE=""
for a in $ARCHS; do GENCODE="$GENCODE -gencode arch=compute_$a,code=sm_$a"; done
status=0
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "check_cuda_compile: no .cu files"; exit 0; fi
"$NVCC" --version | tail -1
for f in "${files[@]}"; do
  echo "nvcc -c $f"
  # shellcheck disable=SC2086
  if ! "$NVCC" -std=c++20 -c "$f" -o "$SHIM/$(basename "$f").o" -I"$SHIM" $TORCH_INC -Icsrc \
      -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DPYOPTIM_WITH_CUDA $GENCODE --expt-relaxed-constexpr \
      -Xcompiler -fPIC -diag-suppress 3306 -Werror cross-execution-space-call; then
    echo "check_cuda_compile: FAILED: $f" >&2
    status=1
  fi
done
[ $status -eq 0 ] && echo "check_cuda_compile: ${#files[@]} file(s) compiled"
exit $status
