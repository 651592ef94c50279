// CUDA kernels of the sparse sub-tensor update family: the device-generic implementation of
// csrc/sparse_update.h (cuDNN convolution backward-weights, cuBLAS GEMM through ATen) on the
// current stream, registered for CUDA. The backward skips every gradient nobody needs; what it
// does compute is best left to the vendor libraries.
#include "../sparse_update.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace pyoptim {
namespace sparse_update {
namespace {

at::Tensor sparse_conv2d_cuda(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& wf,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  c10::cuda::CUDAGuard guard(x.device());
  return sparse_conv2d(x, wt, wf, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor> sparse_conv2d_weight_grad_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef weight_shape,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool bias_grad) {
  c10::cuda::CUDAGuard guard(x.device());
  return sparse_conv2d_weight_grad(grad_out, x, weight_shape, stride, padding, dilation, groups,
                                   bias_grad);
}

at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& wf,
                              const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard guard(x.device());
  return sparse_linear(x, wt, wf, bias);
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_weight_grad_cuda(const at::Tensor& grad_out,
                                                                  const at::Tensor& x,
                                                                  bool bias_grad) {
  c10::cuda::CUDAGuard guard(x.device());
  return sparse_linear_weight_grad(grad_out, x, bias_grad);
}

}  // namespace
}  // namespace sparse_update
}  // namespace pyoptim

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  using namespace pyoptim::sparse_update;
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_conv2d_weight_grad", &sparse_conv2d_weight_grad_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("sparse_linear_weight_grad", &sparse_linear_weight_grad_cuda);
}
