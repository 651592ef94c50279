// The hand kernel of channel_union_conv2d: one implicit-GEMM kernel (SIMT fp32/fp64 FMAs, no tensor
// cores). The op routes to cuDNN by default (channel_union_conv.cu); this kernel runs when cuDNN is
// disabled (torch.backends.cudnn.enabled = False), for degenerate shapes cuDNN does not take, and
// as the benchmark's comparison.
//
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
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../channel_union_conv.h"
#include "channel_union_conv.cuh"
#include "multi_tensor.cuh"

namespace pyoptim {
namespace channel_union_conv {
namespace {

using pyoptim::cuda::ceil_div;

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

// (image, output row, output column) of output pixel m.
__device__ __forceinline__ void decode_pixel(int64_t m, int64_t PQ, int64_t Q, int64_t& n,
                                             int64_t& op, int64_t& oq) {
  n = m / PQ;
  const int64_t pq = m - n * PQ;
  op = pq / Q;
  oq = pq - op * Q;
}

// Where one thread's share of each reduction slice of A and B comes from. The load mappings are
// fixed per thread. A: NCHW runs threads along pixels (q is contiguous in x), channels_last along
// kr (c is contiguous). B: along kr, contiguous in a weight of the same format as x. start_tile
// sets, per output tile, each A load's pixel and each B load's weight row.
template <typename scalar_t, bool kChannelsLast>
struct SliceLoader {
  int a_row[kLoadsPerThread], a_kk[kLoadsPerThread], b_col[kLoadsPerThread], b_kk;
  // x at (n, first channel of the group, 0, 0) (nullptr past M) and the window origin
  const scalar_t* a_src[kLoadsPerThread];
  int64_t a_h0[kLoadsPerThread], a_w0[kLoadsPerThread];
  const scalar_t* b_src[kLoadsPerThread];  // weight row of channel grp*Kg + k; nullptr past Kg

  __device__ __forceinline__ explicit SliceLoader(int tid) {
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
    b_kk = tid % kTileK;
  }

  __device__ __forceinline__ void start_tile(const scalar_t* x, const scalar_t* weight,
                                             const ConvParams& p, int64_t grp, int64_t m0,
                                             int64_t n0) {
    const int64_t PQ = p.P * p.Q;
#pragma unroll
    for (int i = 0; i < kLoadsPerThread; ++i) {
      const int64_t m = m0 + a_row[i];
      a_src[i] = nullptr;
      a_h0[i] = 0;
      a_w0[i] = 0;
      if (m < p.M) {
        int64_t n, op, oq;
        decode_pixel(m, PQ, p.Q, n, op, oq);
        a_src[i] = x + n * p.xs[0] + grp * p.Cg * p.xs[1];
        a_h0[i] = op * p.stride_h - p.pad_h;
        a_w0[i] = oq * p.stride_w - p.pad_w;
      }
    }
#pragma unroll
    for (int i = 0; i < kLoadsPerThread; ++i) {
      const int64_t k = n0 + b_col[i];
      b_src[i] = k < p.Kg ? weight + (grp * p.Kg + k) * p.ws[0] : nullptr;
    }
  }

  // Gathers reduction slice kt of A and B into registers (zeros outside x, M, Kg, Cg*R*S).
  template <typename acc_t>
  __device__ __forceinline__ void load(int kt, const ConvParams& p, acc_t (&a_reg)[kLoadsPerThread],
                                       acc_t (&b_reg)[kLoadsPerThread]) const {
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
  }

  // Stores the registers of a slice into the shared tiles ([kr][pixel] and [kr][channel]).
  template <typename acc_t>
  __device__ __forceinline__ void stage(const acc_t (&a_reg)[kLoadsPerThread],
                                        const acc_t (&b_reg)[kLoadsPerThread],
                                        acc_t (*a_tile)[kTileM + 1],
                                        acc_t (*b_tile)[kTileN + 1]) const {
#pragma unroll
    for (int i = 0; i < kLoadsPerThread; ++i) {
      a_tile[a_kk[i]][a_row[i]] = a_reg[i];
      b_tile[b_kk][b_col[i]] = b_reg[i];
    }
  }
};

// acc += the staged 64x16 A slice times the 16x64 B slice, on this thread's 4x4 micro-tile.
template <typename acc_t>
__device__ __forceinline__ void multiply_slice(const acc_t (*a_tile)[kTileM + 1],
                                               const acc_t (*b_tile)[kTileN + 1], int tm, int tn,
                                               acc_t (&acc)[kMicro][kMicro]) {
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
}

// Fused epilogue, in the reference's order: conv + bias, + residual, ReLU; one store.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_tile(const acc_t (&acc)[kMicro][kMicro], const ConvParams& p,
                                           int64_t grp, int64_t m0, int64_t n0, int tm, int tn,
                                           const scalar_t* __restrict__ bias,
                                           const scalar_t* __restrict__ residual,
                                           scalar_t* __restrict__ out, bool relu) {
  const int64_t PQ = p.P * p.Q;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t m = m0 + tm + kThreadGrid * i;
    if (m >= p.M) continue;
    int64_t n, op, oq;
    decode_pixel(m, PQ, p.Q, n, op, oq);
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
  SliceLoader<scalar_t, kChannelsLast> loader(tid);
  const int k_steps = (p.reduce_len + kTileK - 1) / kTileK;

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    // Pixel tiles vary fastest: consecutive blocks share the group's weight slice (L2 reuse).
    const int64_t mt = tile % p.m_tiles;
    const int64_t rest = tile / p.m_tiles;
    const int64_t nt = rest % p.n_tiles;
    const int64_t grp = rest / p.n_tiles;
    const int64_t m0 = mt * kTileM, n0 = nt * kTileN;
    loader.start_tile(x, weight, p, grp, m0, n0);

    acc_t a_reg[kLoadsPerThread], b_reg[kLoadsPerThread];
    acc_t acc[kMicro][kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);
    }

    if (k_steps > 0) loader.load(0, p, a_reg, b_reg);
    for (int kt = 0; kt < k_steps; ++kt) {
      loader.stage(a_reg, b_reg, a_tile, b_tile);
      __syncthreads();
      // Issue the next slice's global loads now; they complete while this slice is multiplied.
      if (kt + 1 < k_steps) loader.load(kt + 1, p, a_reg, b_reg);
      multiply_slice(a_tile, b_tile, tm, tn, acc);
      __syncthreads();  // the tiles are rewritten by the next slice (or the next output tile)
    }
    store_tile(acc, p, grp, m0, n0, tm, tn, bias, residual, out, relu);
  }
}

ConvParams make_params(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       const at::Tensor& out) {
  const int64_t Cg = weight.size(1), R = weight.size(2), S = weight.size(3);
  const int64_t reduce_len = Cg * R * S;
  TORCH_CHECK(reduce_len <= std::numeric_limits<int32_t>::max() - kTileK,
              "channel_union_conv2d: the reduction per output (C/groups*R*S = ", reduce_len,
              ") is too large");
  ConvParams p{};
  p.H = x.size(2);
  p.W = x.size(3);
  p.P = out.size(2);
  p.Q = out.size(3);
  p.M = out.size(0) * p.P * p.Q;
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
  const bool has_residual = present(residual);
  for (int d = 0; d < 4; ++d) {
    p.xs[d] = x.stride(d);
    p.ws[d] = weight.stride(d);
    p.os[d] = out.stride(d);
    p.rs[d] = has_residual ? residual->stride(d) : 0;
  }
  p.bias_stride = present(bias) ? bias->stride(0) : 0;
  p.m_tiles = ceil_div(p.M, kTileM);
  p.n_tiles = ceil_div(p.Kg, kTileN);
  p.tiles = p.m_tiles * p.n_tiles * groups;
  return p;
}

}  // namespace

void conv2d_simt_out(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                     at::Tensor& out) {
  if (out.numel() == 0) return;
  const ConvParams p =
      make_params(x, weight, bias, residual, stride, padding, dilation, groups, out);
  const bool has_bias = present(bias), has_residual = present(residual);
  const bool channels_last = activation_format(x) == at::MemoryFormat::ChannelsLast;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "channel_union_conv2d_simt", [&] {
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
}

}  // namespace channel_union_conv
}  // namespace pyoptim
