// The sparse sub-tensor update ops, written once for every device: the forward is a conv/linear
// over the concatenated weight, and the weight gradient of the trained prefix is one call of the
// vendor library's backward-weight routine (oneDNN on CPU, cuDNN on CUDA) on the sliced saved
// input, with the bias reduction in the same call. The saving of the method comes from what is
// NOT computed or saved (see pyoptim/ops/sparse_update.py), not from a new GEMM.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "checks.h"

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace pyoptim {
namespace sparse_update {


// Checks and returns the concatenation dim of the split weight.
inline int64_t check_conv_args(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& wf,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "sparse_conv2d";
  check_float(x, op, "x");
  check_float(wt, op, "weight_train");
  check_float(wf, op, "weight_frozen");
  check_same(x, "x", wt, "weight_train", op);
  check_same(x, "x", wf, "weight_frozen", op);
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(wt.dim() == 4 && wf.dim() == 4, op,
              ": weight_train and weight_frozen must be 4-D, got ", wt.sizes(), " and ", wf.sizes());
  check_pair(stride, op, "stride", 1);
  check_pair(padding, op, "padding", 0);
  check_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t dim = groups == 1 ? 1 : 0;
  const int64_t other = 1 - dim;
  TORCH_CHECK(wt.size(other) == wf.size(other) && wt.size(2) == wf.size(2) && wt.size(3) == wf.size(3),
              op, ": weight_train ", wt.sizes(), " and weight_frozen ", wf.sizes(),
              " must differ only in dim ", dim, (groups == 1 ? " (input channels)" : " (output channels)"));
  const int64_t K = groups == 1 ? wt.size(0) : wt.size(0) + wf.size(0);
  const int64_t Cg = wt.size(1);
  const int64_t Cin = groups == 1 ? wt.size(1) + wf.size(1) : Cg * groups;
  TORCH_CHECK(x.size(1) == Cin, op, ": x has ", x.size(1), " channels but the weight expects ", Cin);
  TORCH_CHECK(K % groups == 0, op, ": ", K, " output channels are not divisible by groups=", groups);
  if (groups > 1) {
    TORCH_CHECK(wt.size(0) % (K / groups) == 0, op, ": the trained output-channel prefix (",
                wt.size(0), ") must cover whole conv groups of ", K / groups, " channels");
  }
  if (bias.has_value() && bias->defined()) {
    check_same(x, "x", *bias, "bias", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K, op, ": bias must have shape [", K,
                "], got ", bias->sizes());
  }
  return dim;
}

inline at::Tensor sparse_conv2d(const at::Tensor& x, const at::Tensor& weight_train,
                                const at::Tensor& weight_frozen, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups) {
  const int64_t dim = check_conv_args(x, weight_train, weight_frozen, bias, stride, padding,
                                      dilation, groups);
  const at::Tensor w = at::cat({weight_train, weight_frozen}, dim);
  return at::conv2d(x, w, bias, stride, padding, dilation, groups);
}

inline std::tuple<at::Tensor, at::Tensor> sparse_conv2d_weight_grad(
    const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef weight_shape,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool bias_grad) {
  const char* op = "sparse_conv2d_weight_grad";
  check_float(grad_out, op, "grad_out");
  check_float(x, op, "x");
  check_same(grad_out, "grad_out", x, "x", op);
  TORCH_CHECK(grad_out.dim() == 4 && x.dim() == 4, op, ": grad_out and x must be 4-D, got ",
              grad_out.sizes(), " and ", x.sizes());
  TORCH_CHECK(weight_shape.size() == 4, op, ": weight_shape must have 4 entries, got ", weight_shape);
  check_pair(stride, op, "stride", 1);
  check_pair(padding, op, "padding", 0);
  check_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(groups >= 1 && weight_shape[0] % groups == 0, op, ": weight_shape ", weight_shape,
              " does not fit groups=", groups);
  TORCH_CHECK(grad_out.size(0) == x.size(0), op, ": grad_out has batch ", grad_out.size(0),
              " but x has ", x.size(0));
  TORCH_CHECK(grad_out.size(1) == weight_shape[0], op, ": grad_out has ", grad_out.size(1),
              " channels but weight_shape has ", weight_shape[0], " output channels");
  TORCH_CHECK(x.size(1) == weight_shape[1] * groups, op, ": x has ", x.size(1),
              " channels but weight_shape ", weight_shape, " with groups=", groups, " needs ",
              weight_shape[1] * groups);
  for (int d = 0; d < 2; ++d) {
    const int64_t expect =
        (x.size(2 + d) + 2 * padding[d] - dilation[d] * (weight_shape[2 + d] - 1) - 1) / stride[d] + 1;
    TORCH_CHECK(grad_out.size(2 + d) == expect, op, ": grad_out has spatial size ",
                grad_out.sizes().slice(2), " but the conv of x ", x.sizes().slice(2), " gives ",
                expect, " in dim ", 2 + d);
  }
  const auto opts = x.options();
  if (x.numel() == 0 || grad_out.numel() == 0 || weight_shape[1] == 0 || weight_shape[0] == 0) {
    at::Tensor gb = bias_grad ? at::zeros({weight_shape[0]}, opts) : at::empty({0}, opts);
    return {at::zeros(weight_shape, opts), gb};
  }
  // the weight argument only carries the shape (and is small): never initialised, never read
  const at::Tensor w_shape = at::empty(weight_shape, opts);
  const std::optional<at::IntArrayRef> bias_sizes =
      bias_grad ? std::optional<at::IntArrayRef>(weight_shape.slice(0, 1)) : std::nullopt;
  // both in x's memory format (channels_last stays channels_last: no NCHW copy of either)
  const auto fmt = x.suggest_memory_format();
  auto res = at::convolution_backward(grad_out.contiguous(fmt), x.contiguous(fmt), w_shape,
                                      bias_sizes, stride, padding, dilation, /*transposed=*/false,
                                      /*output_padding=*/{0, 0}, groups, {false, true, bias_grad});
  at::Tensor gb = bias_grad ? std::get<2>(res) : at::empty({0}, opts);
  return {std::get<1>(res), gb};
}

inline at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight_train,
                                const at::Tensor& weight_frozen,
                                const std::optional<at::Tensor>& bias) {
  const char* op = "sparse_linear";
  check_float(x, op, "x");
  check_float(weight_train, op, "weight_train");
  check_float(weight_frozen, op, "weight_frozen");
  check_same(x, "x", weight_train, "weight_train", op);
  check_same(x, "x", weight_frozen, "weight_frozen", op);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim");
  TORCH_CHECK(weight_train.dim() == 2 && weight_frozen.dim() == 2 &&
                  weight_train.size(0) == weight_frozen.size(0),
              op, ": weight_train ", weight_train.sizes(), " and weight_frozen ",
              weight_frozen.sizes(), " must be [K, k] and [K, C-k]");
  const int64_t C = weight_train.size(1) + weight_frozen.size(1);
  TORCH_CHECK(x.size(-1) == C, op, ": x has ", x.size(-1), " features but the weight expects ", C);
  if (bias.has_value() && bias->defined()) {
    check_same(x, "x", *bias, "bias", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight_train.size(0), op,
                ": bias must have shape [", weight_train.size(0), "], got ", bias->sizes());
  }
  return at::linear(x, at::cat({weight_train, weight_frozen}, 1), bias);
}

inline std::tuple<at::Tensor, at::Tensor> sparse_linear_weight_grad(const at::Tensor& grad_out,
                                                                    const at::Tensor& x,
                                                                    bool bias_grad) {
  const char* op = "sparse_linear_weight_grad";
  check_float(grad_out, op, "grad_out");
  check_float(x, op, "x");
  check_same(grad_out, "grad_out", x, "x", op);
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2, op, ": grad_out and x must be 2-D [M, K] and [M, k], got ",
              grad_out.sizes(), " and ", x.sizes());
  TORCH_CHECK(grad_out.size(0) == x.size(0), op, ": grad_out has ", grad_out.size(0),
              " rows but x has ", x.size(0));
  at::Tensor gw = at::mm(grad_out.t(), x);
  at::Tensor gb = bias_grad ? grad_out.sum(0) : at::empty({0}, x.options());
  return {gw, gb};
}

}  // namespace sparse_update
}  // namespace pyoptim
