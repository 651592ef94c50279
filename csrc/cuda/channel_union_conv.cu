// CUDA kernels of the channel-union convolution family, for the CUDA key. The op contract and the
// argument checks are in csrc/channel_union_conv.h; the exact semantics (dtypes, formats) are
// pyoptim/reference/channel_union_conv.py.
//
// channel_union_conv2d: one implicit-GEMM kernel (SIMT fp32/fp64 FMAs, no tensor cores).
//   Per conv group g the conv is a GEMM  out[m, k] = sum_kr A[m, kr] * B[kr, k]  with
//     m  = (n, p, q)  output pixel,            M      = N*P*Q
//     k              output channel of group g, Kg     = K/groups
//     kr = (c, r, s) reduction index,          Cg*R*S = (C/groups)*R*S
//   A[m, kr] = x[n, g*Cg + c, p*sh - ph + r*dh, q*sw - pw + s*dw] (0 in the padding) is never
//   materialised: each element is gathered from x on the fly. A block owns a 64 (pixels) x 64
//   (channels) output tile of one group and walks the reduction in 16-deep slices: the 64x16 slice
//   of A and the 16x64 slice of B are converted to the accumulation dtype and staged in shared
//   memory, then each of the 256 threads updates a 4x4 register micro-tile (outputs t + 16*i of a
//   16x16 thread grid, so shared-memory reads are conflict-free). The next slice's global loads
//   are issued into registers before the current slice is consumed (register prefetch). kr runs
//   (c, r, s) with s fastest for NCHW x and (r, s, c) with c fastest for channels_last x, and the
//   load and store thread mappings follow the layout, so global loads and output stores are
//   coalesced in both formats; any strides are accepted (every operand is indexed through its
//   own 4 strides). The epilogue is fused: + bias, + residual, ReLU, one store of the output in
//   activation_format(x). Each output is summed by one thread in a fixed order (no split-K, no
//   atomics): results are bitwise reproducible. Depthwise/grouped convs run the same kernel with
//   a mostly empty channel tile (correct, not fast).
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
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../channel_union_conv.h"
#include "multi_tensor.cuh"

namespace pyoptim {
namespace channel_union_conv {
namespace {

using pyoptim::cuda::ceil_div;

// ReLU that keeps NaN (like torch.relu): a NaN compares false and passes through.
template <typename acc_t>
__device__ __forceinline__ acc_t relu_keep_nan(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

// ================================================================================================
// channel_union_conv2d: implicit GEMM

constexpr int kConvThreads = 256;
constexpr int kTileM = 64;  // output pixels per tile
constexpr int kTileN = 64;  // output channels (of one group) per tile
constexpr int kTileK = 16;  // reduction slice staged in shared memory
constexpr int kThreadGrid = 16;  // threads per tile dimension: 16 x 16 threads
constexpr int kMicro = 4;        // each thread: kMicro x kMicro outputs, t + kThreadGrid * i
constexpr int kLoadsPerThread = kTileM * kTileK / kConvThreads;  // A (and B) elements per slice
static_assert(kThreadGrid * kThreadGrid == kConvThreads, "one thread per micro-tile");
static_assert(kThreadGrid * kMicro == kTileM && kThreadGrid * kMicro == kTileN, "tile coverage");
static_assert(kTileN * kTileK == kLoadsPerThread * kConvThreads, "A and B slices load alike");
static_assert(kConvThreads % kTileM == 0 && kConvThreads % kTileK == 0, "load mappings tile");

struct ConvParams {
  int64_t H, W;              // x spatial size
  int64_t P, Q;              // output spatial size
  int64_t M;                 // output pixels, N*P*Q
  int64_t Kg;                // output channels per group
  int Cg, R, S;              // input channels per group, kernel size
  int reduce_len;            // Cg*R*S (host-checked to fit, with a slice of headroom)
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t xs[4], ws[4], rs[4], os[4];  // strides of x, weight, residual, out
  int64_t bias_stride;
  int64_t m_tiles, n_tiles, tiles;  // tiles = m_tiles * n_tiles * groups
};

// Reduction index -> (input channel in the group, kernel row, kernel column). The order matches
// the contiguous order of x and weight in the activation format: (c, r, s) with s fastest for
// NCHW, (r, s, c) with c fastest for channels_last.
template <bool kChannelsLast>
__device__ __forceinline__ void decode_reduction(int kr, const ConvParams& p, int& c, int& r,
                                                 int& s) {
  if constexpr (kChannelsLast) {
    const int rs = kr / p.Cg;
    c = kr - rs * p.Cg;
    r = rs / p.S;
    s = rs - r * p.S;
  } else {
    const int cr = kr / p.S;
    s = kr - cr * p.S;
    c = cr / p.R;
    r = cr - c * p.R;
  }
}

template <typename scalar_t, typename acc_t, bool kChannelsLast>
__global__ void __launch_bounds__(kConvThreads)
    conv_implicit_gemm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                              const scalar_t* __restrict__ bias,
                              const scalar_t* __restrict__ residual, scalar_t* __restrict__ out,
                              const ConvParams p, bool relu) {
  // Stored [kr][pixel] and [kr][channel] so the compute loop reads rows; the +1 pad spreads the
  // column-wise stores of the kr-fastest load mappings over the banks.
  __shared__ acc_t a_tile[kTileK][kTileM + 1];
  __shared__ acc_t b_tile[kTileK][kTileN + 1];
  const int tid = static_cast<int>(threadIdx.x);

  // Compute/store mapping: consecutive threads on consecutive pixels (NCHW: pixels are the
  // contiguous output dim) or on consecutive channels (channels_last).
  const int tm = kChannelsLast ? tid / kThreadGrid : tid % kThreadGrid;
  const int tn = kChannelsLast ? tid % kThreadGrid : tid / kThreadGrid;

  // Load mappings. A: NCHW runs threads along pixels (q is contiguous in x), channels_last along kr
  // (c is contiguous). B: along kr, contiguous in a weight of the same format as x.
  int a_row[kLoadsPerThread], a_kk[kLoadsPerThread], b_col[kLoadsPerThread];
#pragma unroll
  for (int i = 0; i < kLoadsPerThread; ++i) {
    if constexpr (kChannelsLast) {
      a_kk[i] = tid % kTileK;
      a_row[i] = tid / kTileK + (kConvThreads / kTileK) * i;
    } else {
      a_row[i] = tid % kTileM;
      a_kk[i] = tid / kTileM + (kConvThreads / kTileM) * i;
    }
    b_col[i] = tid / kTileK + (kConvThreads / kTileK) * i;
  }
  const int b_kk = tid % kTileK;
  const int64_t PQ = p.P * p.Q;
  const int k_steps = (p.reduce_len + kTileK - 1) / kTileK;

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    // Pixel tiles vary fastest: consecutive blocks share the group's weight slice (L2 reuse).
    const int64_t mt = tile % p.m_tiles;
    const int64_t rest = tile / p.m_tiles;
    const int64_t nt = rest % p.n_tiles;
    const int64_t grp = rest / p.n_tiles;
    const int64_t m0 = mt * kTileM, n0 = nt * kTileN;

    // Per-pixel state of this thread's A loads, fixed for the whole reduction: x at
    // (n, first channel of the group, 0, 0) (nullptr past M) and the window origin.
    const scalar_t* a_src[kLoadsPerThread];
    int64_t a_h0[kLoadsPerThread], a_w0[kLoadsPerThread];
#pragma unroll
    for (int i = 0; i < kLoadsPerThread; ++i) {
      const int64_t m = m0 + a_row[i];
      a_src[i] = nullptr;
      a_h0[i] = 0;
      a_w0[i] = 0;
      if (m < p.M) {
        const int64_t n = m / PQ;
        const int64_t pq = m - n * PQ;
        const int64_t op = pq / p.Q;
        const int64_t oq = pq - op * p.Q;
        a_src[i] = x + n * p.xs[0] + grp * p.Cg * p.xs[1];
        a_h0[i] = op * p.stride_h - p.pad_h;
        a_w0[i] = oq * p.stride_w - p.pad_w;
      }
    }
    // Weight row (output channel grp*Kg + k) of each B load; nullptr past Kg.
    const scalar_t* b_src[kLoadsPerThread];
#pragma unroll
    for (int i = 0; i < kLoadsPerThread; ++i) {
      const int64_t k = n0 + b_col[i];
      b_src[i] = k < p.Kg ? weight + (grp * p.Kg + k) * p.ws[0] : nullptr;
    }

    acc_t a_reg[kLoadsPerThread], b_reg[kLoadsPerThread];
    // Gathers reduction slice kt of A and B into registers (zeros outside x, M, Kg, Cg*R*S).
    auto load_slice = [&](int kt) {
#pragma unroll
      for (int i = 0; i < kLoadsPerThread; ++i) {
        acc_t v = acc_t(0);
        const int kr = kt * kTileK + a_kk[i];
        if (a_src[i] != nullptr && kr < p.reduce_len) {
          int c, r, s;
          decode_reduction<kChannelsLast>(kr, p, c, r, s);
          const int64_t ih = a_h0[i] + r * p.dil_h;
          const int64_t iw = a_w0[i] + s * p.dil_w;
          if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) {
            v = static_cast<acc_t>(a_src[i][c * p.xs[1] + ih * p.xs[2] + iw * p.xs[3]]);
          }
        }
        a_reg[i] = v;
      }
      const int kr = kt * kTileK + b_kk;
      int64_t b_off = -1;
      if (kr < p.reduce_len) {
        int c, r, s;
        decode_reduction<kChannelsLast>(kr, p, c, r, s);
        b_off = c * p.ws[1] + r * p.ws[2] + s * p.ws[3];
      }
#pragma unroll
      for (int i = 0; i < kLoadsPerThread; ++i) {
        b_reg[i] = (b_src[i] != nullptr && b_off >= 0) ? static_cast<acc_t>(b_src[i][b_off])
                                                       : acc_t(0);
      }
    };

    acc_t acc[kMicro][kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);
    }

    if (k_steps > 0) load_slice(0);
    for (int kt = 0; kt < k_steps; ++kt) {
#pragma unroll
      for (int i = 0; i < kLoadsPerThread; ++i) {
        a_tile[a_kk[i]][a_row[i]] = a_reg[i];
        b_tile[b_kk][b_col[i]] = b_reg[i];
      }
      __syncthreads();
      // Issue the next slice's global loads now; they complete while this slice is multiplied.
      if (kt + 1 < k_steps) load_slice(kt + 1);
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        acc_t a[kMicro], b[kMicro];
#pragma unroll
        for (int i = 0; i < kMicro; ++i) a[i] = a_tile[kk][tm + kThreadGrid * i];
#pragma unroll
        for (int j = 0; j < kMicro; ++j) b[j] = b_tile[kk][tn + kThreadGrid * j];
#pragma unroll
        for (int i = 0; i < kMicro; ++i) {
#pragma unroll
          for (int j = 0; j < kMicro; ++j) acc[i][j] += a[i] * b[j];
        }
      }
      __syncthreads();  // the tiles are rewritten by the next slice (or the next output tile)
    }

    // Fused epilogue, in the reference's order: conv + bias, + residual, ReLU; one store.
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t m = m0 + tm + kThreadGrid * i;
      if (m >= p.M) continue;
      const int64_t n = m / PQ;
      const int64_t pq = m - n * PQ;
      const int64_t op = pq / p.Q;
      const int64_t oq = pq - op * p.Q;
      const int64_t out_pix = n * p.os[0] + op * p.os[2] + oq * p.os[3];
      const int64_t res_pix = n * p.rs[0] + op * p.rs[2] + oq * p.rs[3];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int64_t k = n0 + tn + kThreadGrid * j;
        if (k >= p.Kg) continue;
        const int64_t channel = grp * p.Kg + k;
        acc_t v = acc[i][j];
        if (bias != nullptr) v += static_cast<acc_t>(bias[channel * p.bias_stride]);
        if (residual != nullptr) v += static_cast<acc_t>(residual[res_pix + channel * p.rs[1]]);
        if (relu) v = relu_keep_nan(v);
        out[out_pix + channel * p.os[1]] = static_cast<scalar_t>(v);
      }
    }
  }
}

// ================================================================================================
// Per-channel reductions of the batch norm ops

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

// ------------------------------------------------------------------------------------------------
// Host side

unsigned int grid_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>(n, std::numeric_limits<int32_t>::max()));
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

at::Tensor channel_union_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& residual,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups, bool relu) {
  const char* op = "channel_union_conv2d";
  const std::array<int64_t, 4> out_shape =
      check_conv(x, weight, bias, residual, stride, padding, dilation, groups);
  check_cuda(x, op, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = activation_format(x);
  at::Tensor out = at::empty(out_shape, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;

  const int64_t Cg = weight.size(1), R = weight.size(2), S = weight.size(3);
  const int64_t reduce_len = Cg * R * S;
  TORCH_CHECK(reduce_len <= std::numeric_limits<int32_t>::max() - kTileK, op,
              ": the reduction per output (C/groups*R*S = ", reduce_len, ") is too large");
  ConvParams p{};
  p.H = x.size(2);
  p.W = x.size(3);
  p.P = out_shape[2];
  p.Q = out_shape[3];
  p.M = out_shape[0] * p.P * p.Q;
  p.Kg = weight.size(0) / groups;
  p.Cg = static_cast<int>(Cg);
  p.R = static_cast<int>(R);
  p.S = static_cast<int>(S);
  p.reduce_len = static_cast<int>(reduce_len);
  p.stride_h = stride[0];
  p.stride_w = stride[1];
  p.pad_h = padding[0];
  p.pad_w = padding[1];
  p.dil_h = dilation[0];
  p.dil_w = dilation[1];
  const bool has_bias = present(bias), has_residual = present(residual);
  for (int d = 0; d < 4; ++d) {
    p.xs[d] = x.stride(d);
    p.ws[d] = weight.stride(d);
    p.os[d] = out.stride(d);
    p.rs[d] = has_residual ? residual->stride(d) : 0;
  }
  p.bias_stride = has_bias ? bias->stride(0) : 0;
  p.m_tiles = ceil_div(p.M, kTileM);
  p.n_tiles = ceil_div(p.Kg, kTileN);
  p.tiles = p.m_tiles * p.n_tiles * groups;

  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "channel_union_conv2d_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = has_bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* r_ptr = has_residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      conv_implicit_gemm_kernel<scalar_t, acc_t, true>
          <<<grid_for(p.tiles), kConvThreads, 0, stream>>>(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, p,
                                                           relu);
    } else {
      conv_implicit_gemm_kernel<scalar_t, acc_t, false>
          <<<grid_for(p.tiles), kConvThreads, 0, stream>>>(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, p,
                                                           relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
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

}  // namespace
}  // namespace channel_union_conv
}  // namespace pyoptim

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("channel_union_conv2d", &pyoptim::channel_union_conv::channel_union_conv2d_cuda);
  m.impl("batch_norm_add_relu", &pyoptim::channel_union_conv::batch_norm_add_relu_cuda);
  m.impl("batch_norm_add_relu_backward",
         &pyoptim::channel_union_conv::batch_norm_add_relu_backward_cuda);
}
