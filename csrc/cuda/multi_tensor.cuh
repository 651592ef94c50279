// Helpers shared by the multi-tensor CUDA kernels (apex multi_tensor_apply style): a list of
// tensors becomes one table of per-tensor metadata plus prefix sums of each tensor's work items,
// and every block finds the tensor of its item by binary search.
#pragma once

#include <cstdint>

namespace pyoptim {
namespace cuda {

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Largest t with start[t] <= item, for start[0] == 0 <= item < start[T]: tensors without work
// (equal consecutive starts) are skipped, so the answer always satisfies item < start[t + 1].
__device__ __forceinline__ int64_t find_tensor(const int64_t* start, int64_t T, int64_t item) {
  int64_t lo = 0, hi = T;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (start[mid] <= item) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace cuda
}  // namespace pyoptim
