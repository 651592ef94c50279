// Input checks shared by the op families' C++ and CUDA kernels: each message names the op and
// the argument (the Python kernels mirror them in pyoptim/ops/_checks.py); and the accumulation
// dtype rule, acc_dtype.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace pyoptim {

// The dtype sums and norms accumulate in: float64 for float64 inputs, float32 otherwise (float32,
// float16, bfloat16). The one rule of every backend (pyoptim/_util.py: acc_dtype for the
// reference and Triton kernels).
inline at::ScalarType acc_dtype(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ",
              name, " must be float16, bfloat16, float32 or float64, got ", s);
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a strided (dense) tensor");
}

inline void check_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn,
                         const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", bn, " is on ", b.device(), " but ", an, " is on ",
              a.device());
}

inline void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn,
                       const char* op) {
  check_device(a, an, b, bn, op);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", bn, " has dtype ", b.scalar_type(),
              " but ", an, " has ", a.scalar_type());
}

inline void check_pair(at::IntArrayRef v, const char* op, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 entries, got ", v.size());
  TORCH_CHECK(v[0] >= min && v[1] >= min, op, ": ", name, " must be >= ", min, ", got ", v);
}

}  // namespace pyoptim
