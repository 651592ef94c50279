// Input checks and shape rules of the channel-union convolution family, shared by the CPU and
// CUDA kernels (the Python kernels in pyoptim/ops/channel_union_conv.py mirror the messages).
//
// After PruneTrain's channel-union reconfiguration a ResNet block is a dense conv over compact
// channel sets whose residual has the same channel set as the conv output, so its tail is dense:
//
//   channel_union_conv2d(x, weight, bias, residual, stride, padding, dilation, groups, relu)
//       = act(conv2d(x, weight, bias) + residual)             (inference: BN folded into weight, bias)
//   batch_norm_add_relu(x, weight, bias, residual, eps, relu) -> (out, mean, invstd)
//       = act(weight * (x - mean) * invstd + bias + residual) (training: batch statistics of x)
//   batch_norm_add_relu_backward(grad_out, out, x, weight, mean, invstd, relu, residual_grad)
//       -> (grad_x, grad_weight, grad_bias, grad_residual)
//
// act = ReLU when relu is true, identity otherwise; residual is optional (None: no add).
// Statistics (mean, invstd) and the BN affine parameters are in the accumulation dtype: float32
// for float16/bfloat16 activations, the activation dtype otherwise (weight/bias may also be given
// in the activation dtype). x may be NCHW-contiguous or channels_last; outputs keep its format.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "checks.h"

#include <array>
#include <optional>
#include <tuple>

namespace pyoptim {
namespace channel_union_conv {

// A per-channel [C] tensor of the activation dtype or of the accumulation dtype.
inline void check_channel_vector(const at::Tensor& v, const char* vn, const at::Tensor& x,
                                 int64_t C, const char* op) {
  check_float(v, op, vn);
  check_device(x, "x", v, vn, op);
  TORCH_CHECK(v.scalar_type() == x.scalar_type() || v.scalar_type() == acc_dtype(x.scalar_type()), op,
              ": ", vn, " has dtype ", v.scalar_type(), " but must be ", x.scalar_type(), " or ",
              acc_dtype(x.scalar_type()), " (the dtype of x or its accumulation dtype)");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C, op, ": ", vn, " must have shape [", C, "], got ",
              v.sizes());
}

// Output spatial sizes of the conv; checks every argument of channel_union_conv2d.
inline std::array<int64_t, 4> check_conv(const at::Tensor& x, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& residual,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups) {
  const char* op = "channel_union_conv2d";
  check_float(x, op, "x");
  check_float(weight, op, "weight");
  check_same(x, "x", weight, "weight", op);
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be [K, C/groups, R, S], got shape ",
              weight.sizes());
  check_pair(stride, op, "stride", 1);
  check_pair(padding, op, "padding", 0);
  check_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t K = weight.size(0);
  TORCH_CHECK(K >= 1, op, ": weight has no output channels (shape ", weight.sizes(), ")");
  TORCH_CHECK(K % groups == 0, op, ": weight has ", K, " output channels, not divisible by groups=",
              groups);
  TORCH_CHECK(x.size(1) == weight.size(1) * groups, op, ": x has ", x.size(1),
              " channels but weight ", weight.sizes(), " with groups=", groups, " expects ",
              weight.size(1) * groups);
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1, op, ": weight has an empty kernel (shape ",
              weight.sizes(), ")");
  std::array<int64_t, 4> out{x.size(0), K, 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t span = dilation[d] * (weight.size(2 + d) - 1) + 1;
    const int64_t padded = x.size(2 + d) + 2 * padding[d];
    TORCH_CHECK(padded >= span, op, ": the kernel (extent ", span, " with dilation) is larger than x's ",
                "padded input (", padded, ") in dim ", 2 + d);
    out[2 + d] = (padded - span) / stride[d] + 1;
  }
  if (bias.has_value() && bias->defined()) {
    check_same(x, "x", *bias, "bias", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K, op, ": bias must have shape [", K, "], got ",
                bias->sizes());
  }
  if (residual.has_value() && residual->defined()) {
    check_same(x, "x", *residual, "residual", op);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out), op, ": residual has shape ",
                residual->sizes(), " but the conv output has shape ", at::IntArrayRef(out));
  }
  return out;
}

// Checks of batch_norm_add_relu.
inline void check_bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             const std::optional<at::Tensor>& residual, double eps) {
  const char* op = "batch_norm_add_relu";
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W], got shape ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(x.numel() > 0, op, ": x is empty (shape ", x.sizes(), "): batch statistics need values");
  check_channel_vector(weight, "weight", x, C, op);
  check_channel_vector(bias, "bias", x, C, op);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  if (residual.has_value() && residual->defined()) {
    check_same(x, "x", *residual, "residual", op);
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual has shape ", residual->sizes(),
                " but x has shape ", x.sizes());
  }
}

inline void check_bn_backward(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x,
                              const at::Tensor& weight, const at::Tensor& mean,
                              const at::Tensor& invstd) {
  const char* op = "batch_norm_add_relu_backward";
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() == 4 && x.numel() > 0, op, ": x must be a non-empty [N, C, H, W], got shape ",
              x.sizes());
  check_float(grad_out, op, "grad_out");
  check_same(x, "x", grad_out, "grad_out", op);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
              " but x has shape ", x.sizes());
  check_float(out, op, "out");
  check_same(x, "x", out, "out", op);
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out has shape ", out.sizes(), " but x has shape ",
              x.sizes());
  const int64_t C = x.size(1);
  check_channel_vector(weight, "weight", x, C, op);
  check_channel_vector(mean, "mean", x, C, op);
  check_channel_vector(invstd, "invstd", x, C, op);
}

// The memory format the kernels work in: channels_last when x is channels_last-contiguous (and
// not also NCHW-contiguous), NCHW otherwise. Every activation-shaped operand is brought to it.
inline at::MemoryFormat activation_format(const at::Tensor& x) {
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

}  // namespace channel_union_conv
}  // namespace pyoptim
