// CUDA kernels of the fused batch-norm tails of the channel-union convolution family (the op
// contract and the checks: csrc/channel_union_conv.h; registered in channel_union_conv.cu).
//
// batch_norm_add_relu: three launches.
//   1 bn_stats_partial_kernel : per (channel, chunk of the N*H*W elements of that channel), each
//       thread runs Welford over its strided elements, then the block merges its threads'
//       (count, mean, M2) with Chan's formula in a fixed tree order and writes one partial.
//   2 bn_stats_finalize_kernel: one warp per channel merges the channel's partials in a fixed
//       order (lane-strided, then a shuffle tree), writes mean and invstd = rsqrt(M2/M + eps) and
//       the fused scale invstd * weight.
//   3 bn_apply_kernel         : out = act((x - mean) * scale + bias + residual), one pass.
// batch_norm_add_relu_backward: the same structure with (sum g, sum g*xhat) instead of the
//   Welford triple: partial sums, a fixed-order finalize (which also writes grad_weight,
//   grad_bias and the per-channel coefficients), then one pass writing grad_x (and grad_residual).
//
// Element j of channel c of an [N, C, H, W] tensor in its activation format sits at
//   (j / inner) * C * inner + c * inner + j % inner,   inner = H*W (NCHW) or 1 (channels_last),
// so both layouts share one traversal. The reductions put threads along j when inner > 1 (NCHW:
// a plane of H*W is contiguous) and 32 channels across a warp when inner == 1 (channels_last rows
// of C are contiguous). The chunking depends only on the shape, never on the device, and no
// reduction uses atomics: statistics and gradients are bitwise reproducible run to run. Nothing
// reads device data on the host.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../channel_union_conv.h"
#include "channel_union_conv.cuh"
#include "multi_tensor.cuh"

namespace pyoptim {
namespace channel_union_conv {
namespace {

using pyoptim::cuda::ceil_div;

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

constexpr int kBnThreads = 256;
constexpr int kBnWarps = kBnThreads / 32;
// A chunk gives each thread at least this many elements (fewer only when a channel is short)...
constexpr int64_t kMinElemsPerThread = 16;
// ...and a channel has at most this many chunks, which bounds the finalize work per channel.
constexpr int64_t kMaxChunks = 512;

// Where the elements of each channel are (see the top comment) and how they are chunked.
struct ChannelLayout {
  int64_t C;              // channels
  int64_t inner;          // H*W (NCHW) or 1 (channels_last)
  int64_t M;              // elements per channel, N*H*W
  int64_t chunks;         // partials per channel
  int64_t chunk_len;      // elements per chunk (the last one may be shorter)
  int64_t channel_tiles;  // ceil(C / lanes)
};

// lanes: channels per block (32 when inner == 1, else 1); rows = kBnThreads / lanes threads
// share a channel. Depends only on the shape: the summation order is reproducible.
ChannelLayout make_layout(int64_t C, int64_t inner, int64_t M, int lanes) {
  ChannelLayout t{};
  const int64_t rows = kBnThreads / lanes;
  t.C = C;
  t.inner = inner;
  t.M = M;
  const int64_t chunks = std::min(std::max<int64_t>(ceil_div(M, rows * kMinElemsPerThread), 1),
                                  kMaxChunks);
  t.chunk_len = ceil_div(M, chunks);
  t.chunks = ceil_div(M, t.chunk_len);  // no empty chunk
  t.channel_tiles = ceil_div(C, lanes);
  return t;
}

// Calls f(offset) for elements j = j0 + row, j0 + row + kRows, ... (< j1) of channel c, in that
// order. (outer, in) = (j / inner, j % inner) is stepped without a division per element.
template <int kRows, typename F>
__device__ __forceinline__ void for_each_in_chunk(const ChannelLayout& t, int64_t c, int64_t j0,
                                                  int64_t j1, int row, F&& f) {
  int64_t j = j0 + row;
  if (j >= j1) return;
  int64_t outer = j / t.inner;
  int64_t in = j - outer * t.inner;
  const int64_t step_outer = kRows / t.inner;
  const int64_t step_in = kRows - step_outer * t.inner;
  const int64_t plane = t.C * t.inner;
  const int64_t channel_off = c * t.inner;
  for (; j < j1; j += kRows) {
    f(outer * plane + channel_off + in);
    in += step_in;
    outer += step_outer;
    if (in >= t.inner) {
      in -= t.inner;
      ++outer;
    }
  }
}

// Merges the per-thread states of a block laid out [row][lane] over the rows, for each lane, with
// a fixed tree (row r absorbs row r + half). Must be reached by the whole block; every thread gets
// its lane's result.
template <int kLanes, typename State, typename Combine>
__device__ __forceinline__ State reduce_rows(State s, State* smem, Combine combine) {
  constexpr int kRows = kBnThreads / kLanes;
  static_assert((kRows & (kRows - 1)) == 0, "the tree needs a power-of-two row count");
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  const int row = static_cast<int>(threadIdx.x) / kLanes;
  smem[threadIdx.x] = s;
  __syncthreads();
#pragma unroll
  for (int half = kRows / 2; half > 0; half >>= 1) {
    if (row < half) {
      smem[row * kLanes + lane] = combine(smem[row * kLanes + lane], smem[(row + half) * kLanes + lane]);
    }
    __syncthreads();
  }
  const State r = smem[lane];
  __syncthreads();  // smem is rewritten by the caller's next item
  return r;
}

template <typename acc_t>
struct Welford {
  acc_t count, mean, m2;
};

template <typename acc_t>
__device__ __forceinline__ void welford_add(Welford<acc_t>& s, acc_t v) {
  s.count += acc_t(1);
  const acc_t delta = v - s.mean;
  s.mean += delta / s.count;
  s.m2 += delta * (v - s.mean);
}

// Chan et al.'s pairwise merge of two (count, mean, M2) summaries.
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> chan_combine(const Welford<acc_t>& a,
                                                       const Welford<acc_t>& b) {
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  const acc_t count = a.count + b.count;
  const acc_t delta = b.mean - a.mean;
  const acc_t frac_b = b.count / count;
  return Welford<acc_t>{count, a.mean + delta * frac_b, a.m2 + b.m2 + delta * delta * a.count * frac_b};
}

template <typename acc_t>
struct ChanCombine {
  __device__ __forceinline__ Welford<acc_t> operator()(const Welford<acc_t>& a,
                                                       const Welford<acc_t>& b) const {
    return chan_combine(a, b);
  }
};

template <typename acc_t>
struct GradSums {
  acc_t g, gxhat;  // sum(g), sum(g * xhat)
};

template <typename acc_t>
struct AddSums {
  __device__ __forceinline__ GradSums<acc_t> operator()(const GradSums<acc_t>& a,
                                                        const GradSums<acc_t>& b) const {
    return GradSums<acc_t>{a.g + b.g, a.gxhat + b.gxhat};
  }
};

// Item = (channel tile, chunk), chunks fastest. Thread (row, lane) handles channel tile*kLanes+lane.
struct ChunkItem {
  int64_t c, chunk, j0, j1;
};

template <int kLanes>
__device__ __forceinline__ ChunkItem decode_item(const ChannelLayout& t, int64_t item) {
  const int64_t ct = item / t.chunks;
  ChunkItem it;
  it.chunk = item - ct * t.chunks;
  it.c = ct * kLanes + static_cast<int>(threadIdx.x) % kLanes;
  it.j0 = it.chunk * t.chunk_len;
  it.j1 = it.j0 + t.chunk_len < t.M ? it.j0 + t.chunk_len : t.M;
  return it;
}

// Partial (count, mean, M2) of x per (channel, chunk); written to part_*[c * chunks + chunk].
template <typename scalar_t, typename acc_t, int kLanes>
__global__ void __launch_bounds__(kBnThreads)
    bn_stats_partial_kernel(const scalar_t* __restrict__ x, const ChannelLayout t,
                            acc_t* __restrict__ part_count, acc_t* __restrict__ part_mean,
                            acc_t* __restrict__ part_m2) {
  constexpr int kRows = kBnThreads / kLanes;
  __shared__ Welford<acc_t> smem[kBnThreads];
  const int row = static_cast<int>(threadIdx.x) / kLanes;
  const int64_t items = t.channel_tiles * t.chunks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const ChunkItem it = decode_item<kLanes>(t, item);
    Welford<acc_t> s{acc_t(0), acc_t(0), acc_t(0)};
    if (it.c < t.C) {
      for_each_in_chunk<kRows>(t, it.c, it.j0, it.j1, row,
                               [&](int64_t off) { welford_add(s, static_cast<acc_t>(x[off])); });
    }
    s = reduce_rows<kLanes>(s, smem, ChanCombine<acc_t>{});
    if (row == 0 && it.c < t.C) {
      const int64_t idx = it.c * t.chunks + it.chunk;
      part_count[idx] = s.count;
      part_mean[idx] = s.mean;
      part_m2[idx] = s.m2;
    }
  }
}

// One warp per channel: merges its partials in a fixed order, then writes mean, invstd and the
// fused scale invstd * weight.
template <typename acc_t>
__global__ void __launch_bounds__(kBnThreads)
    bn_stats_finalize_kernel(const acc_t* __restrict__ part_count,
                             const acc_t* __restrict__ part_mean,
                             const acc_t* __restrict__ part_m2, const ChannelLayout t,
                             const acc_t* __restrict__ weight, acc_t eps, acc_t* __restrict__ mean,
                             acc_t* __restrict__ invstd, acc_t* __restrict__ scale) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBnWarps + warp;
  if (c >= t.C) return;  // warp-uniform: the shuffles below run with full warps
  Welford<acc_t> s{acc_t(0), acc_t(0), acc_t(0)};
  const int64_t base = c * t.chunks;
  for (int64_t k = lane; k < t.chunks; k += 32) {
    s = chan_combine(s, Welford<acc_t>{part_count[base + k], part_mean[base + k], part_m2[base + k]});
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const Welford<acc_t> o{__shfl_down_sync(0xffffffffu, s.count, off),
                           __shfl_down_sync(0xffffffffu, s.mean, off),
                           __shfl_down_sync(0xffffffffu, s.m2, off)};
    s = chan_combine(s, o);
  }
  if (lane == 0) {
    // Biased variance over the exact element count M.
    const acc_t var = s.m2 / static_cast<acc_t>(t.M);
    const acc_t is = rsqrt_acc(var + eps);
    mean[c] = s.mean;
    invstd[c] = is;
    scale[c] = is * weight[c];
  }
}

// Partial (sum g, sum g*xhat) per (channel, chunk), g = relu ? grad_out * (out > 0) : grad_out.
template <typename scalar_t, typename acc_t, int kLanes>
__global__ void __launch_bounds__(kBnThreads)
    bn_grad_partial_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                           const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
                           const acc_t* __restrict__ invstd, const ChannelLayout t, bool relu,
                           acc_t* __restrict__ part_g, acc_t* __restrict__ part_gxhat) {
  constexpr int kRows = kBnThreads / kLanes;
  __shared__ GradSums<acc_t> smem[kBnThreads];
  const int row = static_cast<int>(threadIdx.x) / kLanes;
  const int64_t items = t.channel_tiles * t.chunks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const ChunkItem it = decode_item<kLanes>(t, item);
    GradSums<acc_t> s{acc_t(0), acc_t(0)};
    if (it.c < t.C) {
      const acc_t mu = mean[it.c], is = invstd[it.c];
      for_each_in_chunk<kRows>(t, it.c, it.j0, it.j1, row, [&](int64_t off) {
        acc_t g = static_cast<acc_t>(grad_out[off]);
        if (relu && !(static_cast<acc_t>(out[off]) > acc_t(0))) g = acc_t(0);
        const acc_t xhat = (static_cast<acc_t>(x[off]) - mu) * is;
        s.g += g;
        s.gxhat += g * xhat;
      });
    }
    s = reduce_rows<kLanes>(s, smem, AddSums<acc_t>{});
    if (row == 0 && it.c < t.C) {
      const int64_t idx = it.c * t.chunks + it.chunk;
      part_g[idx] = s.g;
      part_gxhat[idx] = s.gxhat;
    }
  }
}

// One warp per channel: sums its partials in a fixed order; writes grad_weight = sum(g*xhat),
// grad_bias = sum(g) and the coefficients of the grad_x pass.
template <typename acc_t>
__global__ void __launch_bounds__(kBnThreads)
    bn_grad_finalize_kernel(const acc_t* __restrict__ part_g,
                            const acc_t* __restrict__ part_gxhat, const ChannelLayout t,
                            const acc_t* __restrict__ weight, const acc_t* __restrict__ invstd,
                            acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_bias,
                            acc_t* __restrict__ scale, acc_t* __restrict__ mean_g,
                            acc_t* __restrict__ mean_gxhat) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBnWarps + warp;
  if (c >= t.C) return;  // warp-uniform
  acc_t sg = 0, sgx = 0;
  const int64_t base = c * t.chunks;
  for (int64_t k = lane; k < t.chunks; k += 32) {
    sg += part_g[base + k];
    sgx += part_gxhat[base + k];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    sg += __shfl_down_sync(0xffffffffu, sg, off);
    sgx += __shfl_down_sync(0xffffffffu, sgx, off);
  }
  if (lane == 0) {
    const acc_t m = static_cast<acc_t>(t.M);
    grad_weight[c] = sgx;
    grad_bias[c] = sg;
    scale[c] = weight[c] * invstd[c];
    mean_g[c] = sg / m;
    mean_gxhat[c] = sgx / m;
  }
}

// out = act((x - mean) * scale + bias + residual) elementwise, channel = (e / inner) % C.
// index_t: int32 when every flat index fits (cheaper divisions), int64 otherwise.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kBnThreads)
    bn_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                    const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                    const acc_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t numel,
                    index_t inner, index_t C, bool relu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += stride) {
    const index_t ei = static_cast<index_t>(e);
    const index_t c = (ei / inner) % C;
    acc_t v = (static_cast<acc_t>(x[ei]) - mean[c]) * scale[c] + bias[c];
    if (residual != nullptr) v += static_cast<acc_t>(residual[ei]);
    if (relu) v = relu_keep_nan(v);
    out[ei] = static_cast<scalar_t>(v);
  }
}

// grad_x = scale * (g - mean_g - xhat * mean_gxhat); grad_residual = g when requested.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kBnThreads)
    bn_grad_apply_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                         const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
                         const acc_t* __restrict__ invstd, const acc_t* __restrict__ scale,
                         const acc_t* __restrict__ mean_g, const acc_t* __restrict__ mean_gxhat,
                         scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_residual,
                         int64_t numel, index_t inner, index_t C, bool relu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += stride) {
    const index_t ei = static_cast<index_t>(e);
    const index_t c = (ei / inner) % C;
    acc_t g = static_cast<acc_t>(grad_out[ei]);
    if (relu && !(static_cast<acc_t>(out[ei]) > acc_t(0))) g = acc_t(0);
    const acc_t xhat = (static_cast<acc_t>(x[ei]) - mean[c]) * invstd[c];
    grad_x[ei] = static_cast<scalar_t>(scale[c] * (g - mean_g[c] - xhat * mean_gxhat[c]));
    if (grad_residual != nullptr) grad_residual[ei] = static_cast<scalar_t>(g);
  }
}

// Channel layout of a [N, C, H, W] tensor in format fmt (contiguous in it).
ChannelLayout layout_of(const at::Tensor& x, at::MemoryFormat fmt, int& lanes) {
  const int64_t C = x.size(1);
  const int64_t inner = fmt == at::MemoryFormat::ChannelsLast ? 1 : x.size(2) * x.size(3);
  // inner == 1 (channels_last, or NCHW with H*W == 1): channels are the contiguous dim, so a warp
  // spans 32 channels; otherwise a block's threads run along one channel's planes.
  lanes = inner == 1 ? 32 : 1;
  return make_layout(C, inner, x.numel() / C, lanes);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_add_relu_cuda(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, double eps, bool relu) {
  const char* op = "batch_norm_add_relu";
  check_bn_forward(x_in, weight, bias, residual, eps);
  check_cuda(x_in, op, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat fmt = activation_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const int64_t C = x.size(1);
  // [C] host-side conversions to the accumulation dtype (no-ops when already there).
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor b = bias.to(acc).contiguous();
  const bool has_residual = present(residual);
  const at::Tensor res = has_residual ? residual->contiguous(fmt) : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor mean = at::empty({C}, acc_opts), invstd = at::empty({C}, acc_opts);

  int lanes = 1;
  const ChannelLayout t = layout_of(x, fmt, lanes);
  const int64_t n_part = C * t.chunks;
  // Workspace: partial count, mean, M2 ([C, chunks] each), then scale [C].
  at::Tensor ws = at::empty({3 * n_part + C}, acc_opts);
  const int64_t numel = x.numel();
  const int64_t items = t.channel_tiles * t.chunks;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_norm_add_relu_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    acc_t* part_count = ws.mutable_data_ptr<acc_t>();
    acc_t* part_mean = part_count + n_part;
    acc_t* part_m2 = part_mean + n_part;
    acc_t* scale = part_m2 + n_part;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    if (lanes == 32) {
      bn_stats_partial_kernel<scalar_t, acc_t, 32><<<grid_for(items), kBnThreads, 0, stream>>>(
          x_ptr, t, part_count, part_mean, part_m2);
    } else {
      bn_stats_partial_kernel<scalar_t, acc_t, 1><<<grid_for(items), kBnThreads, 0, stream>>>(
          x_ptr, t, part_count, part_mean, part_m2);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_stats_finalize_kernel<acc_t><<<grid_for(ceil_div(C, kBnWarps)), kBnThreads, 0, stream>>>(
        part_count, part_mean, part_m2, t, w.const_data_ptr<acc_t>(), static_cast<acc_t>(eps),
        mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(), scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const scalar_t* r_ptr = has_residual ? res.const_data_ptr<scalar_t>() : nullptr;
    const unsigned int blocks = grid_for(ceil_div(numel, kBnThreads));
    if (numel <= std::numeric_limits<int32_t>::max()) {
      bn_apply_kernel<scalar_t, acc_t, int32_t><<<blocks, kBnThreads, 0, stream>>>(
          x_ptr, r_ptr, mean.const_data_ptr<acc_t>(), scale, b.const_data_ptr<acc_t>(),
          out.mutable_data_ptr<scalar_t>(), numel, static_cast<int32_t>(t.inner),
          static_cast<int32_t>(C), relu);
    } else {
      bn_apply_kernel<scalar_t, acc_t, int64_t><<<blocks, kBnThreads, 0, stream>>>(
          x_ptr, r_ptr, mean.const_data_ptr<acc_t>(), scale, b.const_data_ptr<acc_t>(),
          out.mutable_data_ptr<scalar_t>(), numel, t.inner, C, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_add_relu_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& x_in,
    const at::Tensor& weight, const at::Tensor& mean_in, const at::Tensor& invstd_in, bool relu,
    bool residual_grad) {
  const char* op = "batch_norm_add_relu_backward";
  check_bn_backward(grad_out_in, out_in, x_in, weight, mean_in, invstd_in);
  check_cuda(x_in, op, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat fmt = activation_format(x_in);
  // Every activation-shaped operand in x's format, so one flat index addresses all of them.
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor grad_out = grad_out_in.contiguous(fmt);
  const at::Tensor out = out_in.contiguous(fmt);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const int64_t C = x.size(1);
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor mean = mean_in.to(acc).contiguous();
  const at::Tensor invstd = invstd_in.to(acc).contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor grad_residual = residual_grad ? at::empty(x.sizes(), x.options().memory_format(fmt))
                                           : at::empty({0}, x.options());
  at::Tensor grad_weight = at::empty({C}, acc_opts), grad_bias = at::empty({C}, acc_opts);

  int lanes = 1;
  const ChannelLayout t = layout_of(x, fmt, lanes);
  const int64_t n_part = C * t.chunks;
  // Workspace: partial sum g, sum g*xhat ([C, chunks] each), then scale, mean_g, mean_gxhat [C].
  at::Tensor ws = at::empty({2 * n_part + 3 * C}, acc_opts);
  const int64_t numel = x.numel();
  const int64_t items = t.channel_tiles * t.chunks;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_norm_add_relu_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    acc_t* part_g = ws.mutable_data_ptr<acc_t>();
    acc_t* part_gxhat = part_g + n_part;
    acc_t* scale = part_gxhat + n_part;
    acc_t* mean_g = scale + C;
    acc_t* mean_gxhat = mean_g + C;
    const scalar_t* go_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* out_ptr = out.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const acc_t* mean_ptr = mean.const_data_ptr<acc_t>();
    const acc_t* invstd_ptr = invstd.const_data_ptr<acc_t>();
    if (lanes == 32) {
      bn_grad_partial_kernel<scalar_t, acc_t, 32><<<grid_for(items), kBnThreads, 0, stream>>>(
          go_ptr, out_ptr, x_ptr, mean_ptr, invstd_ptr, t, relu, part_g, part_gxhat);
    } else {
      bn_grad_partial_kernel<scalar_t, acc_t, 1><<<grid_for(items), kBnThreads, 0, stream>>>(
          go_ptr, out_ptr, x_ptr, mean_ptr, invstd_ptr, t, relu, part_g, part_gxhat);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_grad_finalize_kernel<acc_t><<<grid_for(ceil_div(C, kBnWarps)), kBnThreads, 0, stream>>>(
        part_g, part_gxhat, t, w.const_data_ptr<acc_t>(), invstd_ptr,
        grad_weight.mutable_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<acc_t>(), scale, mean_g,
        mean_gxhat);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scalar_t* gr_ptr = residual_grad ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
    const unsigned int blocks = grid_for(ceil_div(numel, kBnThreads));
    if (numel <= std::numeric_limits<int32_t>::max()) {
      bn_grad_apply_kernel<scalar_t, acc_t, int32_t><<<blocks, kBnThreads, 0, stream>>>(
          go_ptr, out_ptr, x_ptr, mean_ptr, invstd_ptr, scale, mean_g, mean_gxhat,
          grad_x.mutable_data_ptr<scalar_t>(), gr_ptr, numel, static_cast<int32_t>(t.inner),
          static_cast<int32_t>(C), relu);
    } else {
      bn_grad_apply_kernel<scalar_t, acc_t, int64_t><<<blocks, kBnThreads, 0, stream>>>(
          go_ptr, out_ptr, x_ptr, mean_ptr, invstd_ptr, scale, mean_g, mean_gxhat,
          grad_x.mutable_data_ptr<scalar_t>(), gr_ptr, numel, t.inner, C, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // grad_weight / grad_bias in weight's dtype (no-op when that is the accumulation dtype).
  return {grad_x, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type()),
          grad_residual};
}

}  // namespace channel_union_conv
}  // namespace pyoptim
