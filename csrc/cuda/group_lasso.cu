// CUDA kernels of the group-lasso op family (PruneTrain's regulariser), for the CUDA key: the host
// side. The kernels themselves are in group_lasso_kernels.cuh.
//
// Launch structure (after NVIDIA apex multi_tensor_apply and torch's _foreach kernels). Every
// weight is seen as a [K, L = Cg*S] row-major matrix, contiguous or channels_last (rows are
// contiguous in both; see group_lasso_kernels.cuh).
//   host : per-tensor metadata (pointers, geometry, layout, offsets into one workspace) goes BY
//          VALUE in the kernels' arguments, in batches of up to Batch<acc_t>::kCapacity tensors
//          (multi_tensor.cuh; 4 KiB of arguments): one launch per kernel for a list that fits,
//          a few for a long one. Nothing is copied host-to-device, so a call can be captured in a
//          CUDA graph. Kernels find a block's tensor by binary search over prefix sums of each
//          tensor's tiles and norm blocks.
//   A gl_partials_kernel : one block per tile (<= 64 rows x 128 columns) of any tensor; writes
//          row sums of squares per (row, column tile) and column sums of squares per
//          (row chunk of one conv group, column) into the workspace.
//   B gl_finish_kernel   : one thread per norm; sums its partials in a fixed order, sqrt, then
//          writes what the op needs: norms, lam/norm coefficients, keep masks, per-block norm sums
//          (at list-wide block indices, so the sums are laid out the same however the list was
//          cut into launches).
//   D gl_penalty_kernel  : a single block sums B's per-block sums of the whole list in a fixed
//          order, times lam: once, after every batch's B.
//   C gl_apply_kernel    : same tiles as A; grad += W*(co+ci), out = W*(a+b), or prune-to-zero.
// Per call, with nb batches: norms = A+B; norms_backward = coef+C; grad_ = nb*(A+B)+D+nb*C;
// prune_ = nb*(A+B)+nb*C (every norm is taken before any weight is zeroed). No floating-point
// atomics anywhere: every sum has a fixed order, so the results are bitwise reproducible run to run
// and do not depend on the batch size. Nothing reads device data on the host.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../group_lasso.h"
#include "group_lasso_kernels.cuh"
#include "multi_tensor.cuh"

namespace pyoptim {
namespace group_lasso {
namespace {

using namespace gpu;  // NOLINT: the kernels and their structs
using pyoptim::cuda::ceil_div;

unsigned int grid_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>(n, std::numeric_limits<int32_t>::max()));
}

// The whole list's metadata and the sizes of what its kernels share.
struct ListPlan {
  std::vector<cuda::BatchEntry<TensorMeta, 2>> list;
  int64_t parts = 0;       // partial-sum elements (workspace of A)
  int64_t n_out = 0;       // sum K: out-channels of the list
  int64_t n_in = 0;        // sum groups*Cg: in-channels of the list
  int64_t norm_blocks = 0; // B's items of the list
};

// Geometry, layout, tiling and workspace offsets of every tensor. Pointers to what the caller
// writes (grads, results) are filled in by the caller.
ListPlan plan_list(at::TensorList weights, const std::vector<Geometry>& geo) {
  ListPlan p;
  p.list.reserve(weights.size());
  for (size_t t = 0; t < weights.size(); ++t) {
    const Geometry& g = geo[t];
    cuda::BatchEntry<TensorMeta, 2> e;
    TensorMeta& m = e.meta;
    m.w = weights[t].const_data_ptr();
    m.out = nullptr;
    m.K = g.K;
    m.Cg = g.Cg;
    m.S = g.S;
    m.groups = g.groups;
    m.part = p.parts;
    m.o_off = p.n_out;
    m.i_off = p.n_in;
    const Tiling tl = tiling(m);
    e.code = g.channels_last ? kChannelsLast : 0;
    e.work[kTiles] = tl.nrt * tl.nct;
    e.work[kNormBlocks] = ceil_div(g.K + g.in_channels(), kNormsPerBlock);
    p.parts += g.K * tl.nct + g.groups * tl.tpg * tl.L;
    p.n_out += g.K;
    p.n_in += g.in_channels();
    p.norm_blocks += e.work[kNormBlocks];
    p.list.push_back(e);
  }
  return p;
}

template <typename acc_t>
at::Tensor workspace(int64_t n, const at::Tensor& like) {
  return at::empty({n}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// Kernels A and B of every batch: everything the list ops and the norms op share.
template <typename scalar_t, typename acc_t>
void launch_norms(const std::vector<Batch<acc_t>>& batches, cudaStream_t stream) {
  for (const Batch<acc_t>& b : batches) {
    if (b.items(kTiles) > 0) {
      gl_partials_kernel<scalar_t, acc_t><<<grid_for(b.items(kTiles)), kThreads, 0, stream>>>(b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (b.items(kNormBlocks) > 0) {
      gl_finish_kernel<acc_t><<<grid_for(b.items(kNormBlocks)), kThreads, 0, stream>>>(b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// Kernel C of every batch; never launched with an empty grid.
template <typename scalar_t, typename acc_t, Apply mode>
void launch_apply(const std::vector<Batch<acc_t>>& batches, cudaStream_t stream) {
  for (const Batch<acc_t>& b : batches) {
    if (b.items(kTiles) == 0) continue;
    gl_apply_kernel<scalar_t, acc_t, mode><<<grid_for(b.items(kTiles)), kThreads, 0, stream>>>(b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

std::tuple<at::Tensor, at::Tensor> group_lasso_norms_cuda(const at::Tensor& w, int64_t groups) {
  const char* op = "group_lasso_norms";
  const Geometry geo = check_weight(w, groups, op, "w");
  check_cuda(w, op, "w");
  c10::cuda::CUDAGuard guard(w.device());
  const at::ScalarType dtype = w.scalar_type();
  const auto nopts = w.options().dtype(acc_dtype(dtype));
  at::Tensor out_norms = at::empty({geo.K}, nopts);
  at::Tensor in_norms = at::empty({geo.in_channels()}, nopts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "group_lasso_norms_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const ListPlan p = plan_list(at::TensorList(w), {geo});
    if (p.norm_blocks == 0) return;  // no norm at all (K == 0 and in_channels == 0)
    at::Tensor ws = workspace<acc_t>(p.parts, w);
    Head<acc_t> h;
    h.ws = ws.mutable_data_ptr<acc_t>();
    h.norm_o = out_norms.mutable_data_ptr<acc_t>();
    h.norm_i = in_norms.mutable_data_ptr<acc_t>();
    launch_norms<scalar_t, acc_t>(cuda::make_batches<Batch<acc_t>>(h, p.list), stream);
  });
  return {out_norms, in_norms};
}

at::Tensor group_lasso_norms_backward_cuda(const at::Tensor& grad_out_norms,
                                           const at::Tensor& grad_in_norms, const at::Tensor& w,
                                           const at::Tensor& out_norms, const at::Tensor& in_norms,
                                           int64_t groups) {
  const char* op = "group_lasso_norms_backward";
  const Geometry geo = check_weight(w, groups, op, "w");
  check_norms_backward(grad_out_norms, grad_in_norms, w, out_norms, in_norms, geo);
  check_cuda(w, op, "w");
  c10::cuda::CUDAGuard guard(w.device());
  const at::ScalarType dtype = w.scalar_type();
  at::Tensor grad_w = at::empty_like(w);  // w's layout (dense: its exact strides)
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gl_norms_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    ListPlan p = plan_list(at::TensorList(w), {geo});
    p.list[0].meta.out = grad_w.mutable_data_ptr<scalar_t>();
    if (p.list[0].work[kTiles] == 0) return;  // no element to write (also K + in_channels == 0)
    const int64_t n = geo.K + geo.in_channels();
    at::Tensor coef = workspace<acc_t>(n, w);
    Head<acc_t> h;
    h.coef_o = coef.mutable_data_ptr<acc_t>();
    h.coef_i = h.coef_o + geo.K;
    gl_backward_coef_kernel<acc_t><<<grid_for(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
        grad_out_norms.const_data_ptr<acc_t>(), out_norms.const_data_ptr<acc_t>(), geo.K,
        grad_in_norms.const_data_ptr<acc_t>(), in_norms.const_data_ptr<acc_t>(), geo.in_channels(),
        h.coef_o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_apply<scalar_t, acc_t, Apply::kScale>(cuda::make_batches<Batch<acc_t>>(h, p.list), stream);
  });
  return grad_w;
}

at::Tensor group_lasso_grad_cuda(at::TensorList weights, at::TensorList grads, double lam,
                                 at::OptionalIntArrayRef groups) {
  const char* op = "group_lasso_grad_";
  TORCH_CHECK(std::isfinite(lam) && lam >= 0, op, ": lam must be finite and >= 0, got ", lam);
  const std::vector<Geometry> geo = check_lists(weights, &grads, groups, op);
  check_disjoint(grads, op, "grads");
  if (weights.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  check_cuda(weights[0], op, "weights[0]");
  c10::cuda::CUDAGuard guard(weights[0].device());
  const at::ScalarType dtype = weights[0].scalar_type();
  at::Tensor penalty = at::empty({}, weights[0].options().dtype(acc_dtype(dtype)));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "group_lasso_grad_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    ListPlan p = plan_list(weights, geo);
    for (size_t i = 0; i < weights.size(); ++i) p.list[i].meta.out = grads[i].mutable_data_ptr();
    // One workspace: partials, then the coefficients (out, in), then B's per-block sums.
    at::Tensor ws = workspace<acc_t>(p.parts + p.n_out + p.n_in + p.norm_blocks, weights[0]);
    Head<acc_t> h;
    h.ws = ws.mutable_data_ptr<acc_t>();
    h.coef_o = h.ws + p.parts;
    h.coef_i = h.coef_o + p.n_out;
    h.block_sums = h.coef_i + p.n_in;
    h.lam = static_cast<acc_t>(lam);
    const std::vector<Batch<acc_t>> batches = cuda::make_batches<Batch<acc_t>>(h, p.list);
    launch_norms<scalar_t, acc_t>(batches, stream);
    // Always launched (one block) so that the penalty is written even when there are no norms.
    gl_penalty_kernel<acc_t><<<1, kThreads, 0, stream>>>(h.block_sums, p.norm_blocks, h.lam,
                                                         penalty.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_apply<scalar_t, acc_t, Apply::kGrad>(batches, stream);
  });
  return penalty;
}

std::tuple<at::Tensor, at::Tensor> group_lasso_prune_cuda(at::TensorList weights, double threshold,
                                                          at::OptionalIntArrayRef groups) {
  const char* op = "group_lasso_prune_";
  TORCH_CHECK(std::isfinite(threshold) && threshold >= 0, op,
              ": threshold must be finite and >= 0, got ", threshold);
  const std::vector<Geometry> geo = check_lists(weights, nullptr, groups, op);
  check_disjoint(weights, op, "weights");
  if (weights.empty()) {
    const auto empty_opts = at::TensorOptions().dtype(at::kBool);
    return {at::empty({0}, empty_opts), at::empty({0}, empty_opts)};
  }
  check_cuda(weights[0], op, "weights[0]");
  c10::cuda::CUDAGuard guard(weights[0].device());
  const at::ScalarType dtype = weights[0].scalar_type();
  const auto bopts = weights[0].options().dtype(at::kBool);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ListPlan p = plan_list(weights, geo);
  // The masks of all weights, concatenated (see the schema in csrc/ops.cpp): o_off and i_off of
  // each tensor are its offsets in them.
  at::Tensor out_keep = at::empty({p.n_out}, bopts), in_keep = at::empty({p.n_in}, bopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "group_lasso_prune_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    // written: materialises a copy-on-write storage
    for (size_t i = 0; i < weights.size(); ++i) p.list[i].meta.w = weights[i].mutable_data_ptr();
    if (p.norm_blocks == 0) return;  // no norm, hence no element either
    at::Tensor ws = workspace<acc_t>(p.parts, weights[0]);
    Head<acc_t> h;
    h.ws = ws.mutable_data_ptr<acc_t>();
    h.keep_o = out_keep.mutable_data_ptr<bool>();
    h.keep_i = in_keep.mutable_data_ptr<bool>();
    h.threshold = static_cast<acc_t>(threshold);
    const std::vector<Batch<acc_t>> batches = cuda::make_batches<Batch<acc_t>>(h, p.list);
    // Every norm of every batch is taken (A, B) before any element is zeroed (C), on one stream.
    launch_norms<scalar_t, acc_t>(batches, stream);
    launch_apply<scalar_t, acc_t, Apply::kPrune>(batches, stream);
  });
  return {out_keep, in_keep};
}

}  // namespace
}  // namespace group_lasso
}  // namespace pyoptim

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("group_lasso_norms", &pyoptim::group_lasso::group_lasso_norms_cuda);
  m.impl("group_lasso_norms_backward", &pyoptim::group_lasso::group_lasso_norms_backward_cuda);
  m.impl("group_lasso_grad_", &pyoptim::group_lasso::group_lasso_grad_cuda);
  m.impl("group_lasso_prune_", &pyoptim::group_lasso::group_lasso_prune_cuda);
}
