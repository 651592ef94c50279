// Every op of the pyoptim library is declared here, once. Kernels register themselves per backend:
//   csrc/cpu/<family>.cpp   TORCH_LIBRARY_IMPL(pyoptim, CPU, m)
//   csrc/cuda/<family>.cu   TORCH_LIBRARY_IMPL(pyoptim, CUDA, m)
// Fake (meta) kernels, autograd and the Triton / reference fallbacks are registered from Python
// (pyoptim/ops/<family>.py).
#include <Python.h>
#include <torch/library.h>

#include <pybind11/pybind11.h>

TORCH_LIBRARY(pyoptim, m) {
  // ---- group lasso (PruneTrain's regulariser) -------------------------------------------------
  // W of shape [K, C/groups, *]: out-channel groups W[k], in-channel groups W[rows of group g, j].
  m.def("group_lasso_norms(Tensor w, int groups=1) -> (Tensor out_norms, Tensor in_norms)");
  m.def(
      "group_lasso_norms_backward(Tensor grad_out_norms, Tensor grad_in_norms, Tensor w, "
      "Tensor out_norms, Tensor in_norms, int groups=1) -> Tensor");
  m.def(
      "group_lasso_grad_(Tensor[] weights, Tensor(a!)[] grads, float lam, int[]? groups=None) "
      "-> Tensor");
  // The keep-masks of all weights come back concatenated (out_keep: sum K_i, in_keep: sum C_i):
  // functionalization (torch.compile) cannot handle a mutating op that returns Tensor[].
  m.def(
      "group_lasso_prune_(Tensor(a!)[] weights, float threshold, int[]? groups=None) "
      "-> (Tensor out_keep, Tensor in_keep)");

  // ---- sparse sub-tensor update (Lin et al. 2022) ---------------------------------------------
  // A weight split into a trained prefix and a frozen rest, forward = conv2d/linear with
  // cat(weight_train, weight_frozen): along dim 1 (input channels) when groups == 1, along dim 0
  // (output channels) for grouped and depthwise convs, along dim 1 (input features) for linear.
  m.def(
      "sparse_conv2d(Tensor x, Tensor weight_train, Tensor weight_frozen, Tensor? bias, "
      "int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1) -> Tensor");
  // Weight gradient of a conv of weight shape `weight_shape` from its (sliced) input and output
  // gradient, with the bias gradient grad_out.sum((0, 2, 3)) fused (empty when bias_grad is false).
  m.def(
      "sparse_conv2d_weight_grad(Tensor grad_out, Tensor x, int[] weight_shape, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool bias_grad) "
      "-> (Tensor grad_weight, Tensor grad_bias)");
  m.def("sparse_linear(Tensor x, Tensor weight_train, Tensor weight_frozen, Tensor? bias) -> Tensor");
  m.def(
      "sparse_linear_weight_grad(Tensor grad_out, Tensor x, bool bias_grad) "
      "-> (Tensor grad_weight, Tensor grad_bias)");

  // ---- channel compaction (PruneTrain's reconfiguration) --------------------------------------
  // out[i] = tensors[i].index_select(dims[i], indices[i]) for a whole list in one pass: every
  // parameter, gradient, optimizer state and BN statistic of a reconfigured model.
  m.def("channel_compact(Tensor[] tensors, int[] dims, Tensor[] indices) -> Tensor[]");

  // ---- channel-union pruned convolution (PruneTrain's reconfigured blocks) --------------------
  // Inference (BN folded into weight and bias): out = act(conv2d(x, weight, bias) + residual),
  // act = ReLU when relu, identity otherwise; residual optional. One pass writes the output.
  m.def(
      "channel_union_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, "
      "int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, bool relu=True) -> Tensor");
  // Training tail over a conv output x [N, C, H, W] with batch statistics over (N, H, W):
  // out = act(weight * (x - mean) * invstd + bias + residual); mean/invstd returned for the
  // backward and the running statistics (var = invstd^-2 - eps, biased).
  m.def(
      "batch_norm_add_relu(Tensor x, Tensor weight, Tensor bias, Tensor? residual, float eps, "
      "bool relu=True) -> (Tensor out, Tensor mean, Tensor invstd)");
  // Its backward: g = grad_out * (out > 0) (relu) or grad_out; grad_residual = g (empty unless
  // residual_grad); grad_weight = sum(g * xhat), grad_bias = sum(g),
  // grad_x = weight * invstd * (g - grad_bias / M - xhat * grad_weight / M), M = N*H*W.
  m.def(
      "batch_norm_add_relu_backward(Tensor grad_out, Tensor out, Tensor x, Tensor weight, "
      "Tensor mean, Tensor invstd, bool relu, bool residual_grad) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
}

namespace {
bool built_with_cuda() {
#ifdef PYOPTIM_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyoptim compiled kernels; the ops are reached as torch.ops.pyoptim.*";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
#ifdef PYOPTIM_CUDA_VERSION
  m.attr("cuda_version") = PYOPTIM_CUDA_VERSION;
#else
  m.attr("cuda_version") = pybind11::none();
#endif
}
