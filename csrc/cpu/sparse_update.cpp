// CPU kernels of the sparse sub-tensor update family: the device-generic implementation of
// csrc/sparse_update.h (oneDNN convolution backward-weights, MKL GEMM), registered for CPU.
#include "../sparse_update.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  using namespace pyoptim::sparse_update;
  m.impl("sparse_conv2d", &sparse_conv2d);
  m.impl("sparse_conv2d_weight_grad", &sparse_conv2d_weight_grad);
  m.impl("sparse_linear", &sparse_linear);
  m.impl("sparse_linear_weight_grad", &sparse_linear_weight_grad);
}
