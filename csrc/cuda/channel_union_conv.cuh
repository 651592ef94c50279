// What the CUDA translation units of the channel-union convolution family share:
//   channel_union_conv.cu       channel_union_conv2d's routing (cuDNN / hand kernel), the cuDNN
//                               route's epilogue kernel, the family's TORCH_LIBRARY_IMPL block
//   channel_union_conv_simt.cu  the hand SIMT implicit GEMM with its fused epilogue
//   channel_union_conv_bn.cu    batch_norm_add_relu and its backward
// The op contract and the argument checks are in csrc/channel_union_conv.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace pyoptim {
namespace channel_union_conv {

// ReLU that keeps NaN (like torch.relu): a NaN compares false and passes through.
template <typename acc_t>
__device__ __forceinline__ acc_t relu_keep_nan(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

inline unsigned int grid_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>(n, std::numeric_limits<int32_t>::max()));
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The hand kernel (channel_union_conv_simt.cu): act(conv2d(x, weight) + bias + residual) into
// `out`, a tensor of the conv output's shape in activation_format(x). Arguments checked by the
// caller (check_conv), on x's device; any strides. Launches on the current stream.
void conv2d_simt_out(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                     at::Tensor& out);

// channel_union_conv_bn.cu
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_add_relu_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, double eps, bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_add_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd, bool relu,
    bool residual_grad);

}  // namespace channel_union_conv
}  // namespace pyoptim
