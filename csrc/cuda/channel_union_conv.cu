// channel_union_conv2d on CUDA, and the CUDA registrations of the channel-union convolution family
// (the op contract and checks: csrc/channel_union_conv.h; the semantics:
// pyoptim/reference/channel_union_conv.py). The batch-norm ops are in channel_union_conv_bn.cu,
// the hand implicit GEMM in channel_union_conv_simt.cu.
//
// Each call takes one of three routes, chosen on the host from the arguments and torch's cuDNN
// flags (nothing reads device data):
//   fused    cuDNN, one graph: conv, then + residual, + bias and ReLU in float on the tile, one
//            store. at::cudnn_convolution_add_relu (residual) or at::cudnn_convolution_relu (none).
//            Taken when cuDNN is enabled, groups == 1, relu, float16/bfloat16/float32, and
//            neither torch.backends.cudnn.deterministic nor torch.use_deterministic_algorithms
//            is set (these calls do not take the deterministic flag).
//   unfused  cuDNN's (or torch's depthwise) convolution without bias through at::convolution,
//            then ONE epilogue kernel in place: out = act(y + bias + residual). Everything else
//            while cuDNN is enabled: relu=False, grouped and depthwise convs (the fused graph
//            takes groups == 1 only), float64, deterministic mode, and shapes for which the
//            fused call threw (no cuDNN engine for the graph, e.g. channel counts the runtime
//            fusion engines do not align on): such a shape is remembered and goes straight here.
//   simt     the hand kernel (SIMT implicit GEMM, bitwise reproducible), when cuDNN is disabled:
//            torch.backends.cudnn.enabled = False, or `with torch.backends.cudnn.flags(
//            enabled=False):` around the call (the benchmark's comparison) -- and for shapes with
//            nothing to convolve (empty x, or C/groups == 0), which cuDNN does not take.
// float32 convolutions on the cuDNN routes follow torch.backends.cudnn.allow_tf32 (TF32 by
// default, as F.conv2d); the hand kernel is exact float32 FMA.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <unordered_set>

#include "../channel_union_conv.h"
#include "channel_union_conv.cuh"
#include "multi_tensor.cuh"

namespace pyoptim {
namespace channel_union_conv {
namespace {

using pyoptim::cuda::ceil_div;

constexpr int kEpilogueThreads = 256;

// y = act(y + bias[c] + residual) in place, channel c = (e / inner) % C; y and residual are
// contiguous in the same format (inner = H*W for NCHW, 1 for channels_last). bias/residual may
// be null. index_t: int32 when every flat index fits (cheaper divisions), int64 otherwise.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kEpilogueThreads)
    conv_epilogue_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ bias,
                         const scalar_t* __restrict__ residual, int64_t numel, index_t inner,
                         index_t C, bool relu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += stride) {
    const index_t ei = static_cast<index_t>(e);
    acc_t v = static_cast<acc_t>(y[ei]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[(ei / inner) % C]);
    if (residual != nullptr) v += static_cast<acc_t>(residual[ei]);
    if (relu) v = relu_keep_nan(v);
    y[ei] = static_cast<scalar_t>(v);
  }
}

void launch_epilogue(at::Tensor& y, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, bool relu, at::MemoryFormat fmt) {
  const bool has_bias = present(bias), has_residual = present(residual);
  if (!has_bias && !has_residual && !relu) return;
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor r = has_residual ? residual->contiguous(fmt) : at::Tensor();
  const int64_t numel = y.numel(), C = y.size(1);
  const int64_t inner = fmt == at::MemoryFormat::ChannelsLast ? 1 : y.size(2) * y.size(3);
  const unsigned int blocks = grid_for(ceil_div(numel, kEpilogueThreads));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "channel_union_conv2d_epilogue", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    const scalar_t* b_ptr = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* r_ptr = has_residual ? r.const_data_ptr<scalar_t>() : nullptr;
    if (numel <= std::numeric_limits<int32_t>::max()) {
      conv_epilogue_kernel<scalar_t, acc_t, int32_t><<<blocks, kEpilogueThreads, 0, stream>>>(
          y_ptr, b_ptr, r_ptr, numel, static_cast<int32_t>(inner), static_cast<int32_t>(C), relu);
    } else {
      conv_epilogue_kernel<scalar_t, acc_t, int64_t><<<blocks, kEpilogueThreads, 0, stream>>>(
          y_ptr, b_ptr, r_ptr, numel, inner, C, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- shapes cuDNN's fused call refused ---------------------------------------------------------

// Everything the fused call's engine choice can depend on (torch keys its plan cache on the same).
using ShapeKey = std::array<int64_t, 19>;

struct ShapeKeyHash {
  size_t operator()(const ShapeKey& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

class RefusedShapes {
 public:
  bool contains(const ShapeKey& k) {
    if (!any_.load(std::memory_order_acquire)) return false;  // the common case: no lock
    std::lock_guard<std::mutex> lock(mu_);
    return set_.count(k) > 0;
  }
  void add(const ShapeKey& k) {
    std::lock_guard<std::mutex> lock(mu_);
    set_.insert(k);
    any_.store(true, std::memory_order_release);
  }

 private:
  std::atomic<bool> any_{false};
  std::mutex mu_;
  std::unordered_set<ShapeKey, ShapeKeyHash> set_;
};

RefusedShapes& refused_shapes() {
  static RefusedShapes shapes;
  return shapes;
}

ShapeKey shape_key(const at::Tensor& x, const at::Tensor& weight, bool has_bias, bool has_residual,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                   at::MemoryFormat fmt) {
  ShapeKey k{};
  int i = 0;
  k[i++] = x.get_device();
  k[i++] = static_cast<int64_t>(x.scalar_type());
  k[i++] = static_cast<int64_t>(fmt);
  k[i++] = has_bias;
  k[i++] = has_residual;
  for (int d = 0; d < 4; ++d) k[i++] = x.size(d);
  for (int d = 0; d < 4; ++d) k[i++] = weight.size(d);
  for (int d = 0; d < 2; ++d) {
    k[i++] = stride[d];
    k[i++] = padding[d];
    k[i++] = dilation[d];
  }
  return k;
}

// ---- routing ------------------------------------------------------------------------------------

enum class Route { kFused, kUnfused, kSimt };

Route choose_route(const at::Tensor& x, const at::Tensor& weight, int64_t groups, bool relu) {
  auto& ctx = at::globalContext();
  if (!at::Context::hasCuDNN() || !ctx.userEnabledCuDNN()) return Route::kSimt;
  if (x.numel() == 0 || weight.size(1) == 0) return Route::kSimt;
  const at::ScalarType s = x.scalar_type();
  const bool fused_dtype = s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
  if (groups == 1 && relu && fused_dtype && !ctx.deterministicCuDNN() &&
      !ctx.deterministicAlgorithms()) {
    return Route::kFused;
  }
  return Route::kUnfused;
}

// at::convolution without bias (cuDNN, or torch's depthwise kernels), then the fused epilogue.
at::Tensor conv2d_unfused(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          bool relu, at::MemoryFormat fmt) {
  // x and weight in the output's format: cuDNN writes channels_last when either operand is.
  at::Tensor y = at::convolution(x.contiguous(fmt), weight.contiguous(fmt), std::nullopt, stride,
                                 padding, dilation, /*transposed=*/false,
                                 /*output_padding=*/{0, 0}, groups)
                     .contiguous(fmt);
  launch_epilogue(y, bias, residual, relu, fmt);
  return y;
}

// The fused cuDNN call; nullopt when cuDNN has no engine for it (remembered per shape).
std::optional<at::Tensor> conv2d_fused(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& residual,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, at::MemoryFormat fmt) {
  const bool has_bias = present(bias), has_residual = present(residual);
  const ShapeKey key = shape_key(x, weight, has_bias, has_residual, stride, padding, dilation, fmt);
  if (refused_shapes().contains(key)) return std::nullopt;
  const at::Tensor xf = x.contiguous(fmt), wf = weight.contiguous(fmt);
  // torch views the bias as [1, K, 1, 1] with its own stride for cuDNN: give it a dense one
  const std::optional<at::Tensor> b =
      has_bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  try {
    at::Tensor out =
        has_residual
            ? at::cudnn_convolution_add_relu(xf, wf, residual->contiguous(fmt),
                                             /*alpha=*/std::nullopt, b, stride, padding, dilation,
                                             /*groups=*/1)
            : at::cudnn_convolution_relu(xf, wf, b, stride, padding, dilation, /*groups=*/1);
    return out.contiguous(fmt);
  } catch (const c10::OutOfMemoryError&) {
    throw;  // not a property of the shape
  } catch (const c10::Error& e) {
    refused_shapes().add(key);
    TORCH_WARN_ONCE("channel_union_conv2d: cuDNN has no fused conv+add+ReLU engine for x ",
                    x.sizes(), " (", x.scalar_type(), "), weight ", weight.sizes(),
                    "; this shape (and any other cuDNN refuses) runs cuDNN's convolution and a "
                    "fused epilogue instead. cuDNN said: ", e.what_without_backtrace());
    return std::nullopt;
  }
}

at::Tensor channel_union_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& residual,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups, bool relu) {
  const std::array<int64_t, 4> out_shape =
      check_conv(x, weight, bias, residual, stride, padding, dilation, groups);
  check_cuda(x, "channel_union_conv2d", "x");
  c10::cuda::CUDAGuard guard(x.device());
  // The aten calls below must run in x's dtype, also inside an autocast region.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::MemoryFormat fmt = activation_format(x);
  const Route route = out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3] == 0
                          ? Route::kSimt
                          : choose_route(x, weight, groups, relu);
  if (route == Route::kFused) {
    if (auto out = conv2d_fused(x, weight, bias, residual, stride, padding, dilation, fmt)) {
      return *out;
    }
  }
  if (route != Route::kSimt) {
    return conv2d_unfused(x, weight, bias, residual, stride, padding, dilation, groups, relu, fmt);
  }
  at::Tensor out = at::empty(out_shape, x.options().memory_format(fmt));
  conv2d_simt_out(x, weight, bias, residual, stride, padding, dilation, groups, relu, out);
  return out;
}

}  // namespace
}  // namespace channel_union_conv
}  // namespace pyoptim

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("channel_union_conv2d", &pyoptim::channel_union_conv::channel_union_conv2d_cuda);
  m.impl("batch_norm_add_relu", &pyoptim::channel_union_conv::batch_norm_add_relu_cuda);
  m.impl("batch_norm_add_relu_backward",
         &pyoptim::channel_union_conv::batch_norm_add_relu_backward_cuda);
}
