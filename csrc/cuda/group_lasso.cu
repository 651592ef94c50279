// CUDA kernels of the group-lasso op family (PruneTrain's regulariser), for the CUDA key.
//
// Launch structure (NVIDIA apex multi_tensor_apply style: a fixed launch set, whatever the number
// of tensors). Every weight is seen as a [K, L = Cg*S] row-major matrix.
//   host : one metadata table (per-tensor geometry and pointers, plus prefix sums of each tensor's
//          tiles and norm blocks) packed into a pinned buffer, copied H2D non_blocking on the
//          current stream. Kernels find a block's tensor by binary search over the prefix sums, so
//          the table is O(#tensors), not O(#tiles).
//   A gl_partials_kernel : one block per tile (<= 64 rows x 128 columns) of any tensor; writes
//          row sums of squares per (row, column tile) and column sums of squares per
//          (row chunk of one conv group, column) into flat partial buffers.
//   B gl_finish_kernel   : one thread per norm; sums its partials in a fixed order, sqrt, then
//          writes what the op needs: norms, lam/norm coefficients, keep masks, per-block norm sums.
//   D gl_penalty_kernel  : a single block sums B's per-block sums in a fixed order, times lam.
//   C gl_apply_kernel    : same tiles as A; grad += W*(co+ci), out = W*(a+b), or prune-to-zero.
// Per call: norms = copy+A+B; norms_backward = copy+coef+C; grad_ = copy+A+B+D+C;
// prune_ = copy+A+B+C. No floating-point atomics anywhere: every sum has a fixed order, so the
// results are bitwise reproducible run to run. Nothing reads device data on the host.
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
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../group_lasso.h"
#include "multi_tensor.cuh"

namespace pyoptim {
namespace group_lasso {
namespace {

// 256 threads = 8 warps; a tile is 64 rows x 128 columns, so each thread covers 8 rows x 4
// columns (32 elements): enough work per block to hide latency, while the per-tile column partials
// (1/64 of the weight in the worst dense case) stay small. Lanes run along the contiguous
// dimension (column = lane + 32*i), so every warp load is coalesced.
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 64;
constexpr int kTileCols = 128;
constexpr int kColsPerLane = kTileCols / 32;
constexpr int kNormsPerBlock = kThreads;
static_assert(kTileCols % 32 == 0 && kTileCols <= kThreads,
              "the column merge needs a thread per column");
static_assert(kTileRows % kWarps == 0, "packed tiles hold a multiple of kWarps groups");

// Row tiles never mix conv groups in the column partials:
//  * shared mode (R = K/groups >= kWarps): a row tile is a chunk of <= 64 rows of ONE group; all
//    warps work on it and their column sums are merged in shared memory. A group has
//    tpg = ceil(R/64) chunks, and the column partials are indexed by chunk = g*tpg + sub.
//  * packed mode (1 <= R < kWarps, e.g. depthwise R == 1): a row tile holds gpt whole groups, and
//    each group is owned by one warp, which writes its column sums directly (tpg == 1). Shared
//    mode there would leave most warps idle with R rows per tile.
template <typename acc_t>
struct TensorMeta {
  const void* w;     // weight (written by prune_)
  void* out;         // grad (grad_) or result (norms_backward)
  acc_t* rowpart;    // [K, nct]
  acc_t* colpart;    // [groups*tpg, L]
  acc_t* norm_o;     // optional outputs of B, [K] and [groups*Cg]
  acc_t* norm_i;
  acc_t* coef_o;     // lam/norm (grad_) or grad/norm (norms_backward)
  acc_t* coef_i;
  bool* keep_o;      // prune_ masks
  bool* keep_i;
  int64_t K, Cg, S, L, R, groups;
  int64_t nct;       // column tiles
  int64_t tpg;       // column-partial chunks per group (0 when K == 0)
  int64_t gpt;       // groups per row tile in packed mode, 0 in shared mode
};

template <typename acc_t>
struct Table {
  const TensorMeta<acc_t>* meta;
  const int64_t* tile_start;  // [T+1], prefix sums of nrt*nct
  const int64_t* norm_start;  // [T+1], prefix sums of ceil((K + groups*Cg) / kNormsPerBlock)
  int64_t T;
};

using pyoptim::cuda::ceil_div;
using pyoptim::cuda::find_tensor;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

struct Tile {
  int64_t rb, re;  // rows [rb, re)
  int64_t gb, ge;  // packed mode: groups [gb, ge)
  int64_t chunk;   // shared mode: column-partial chunk g*tpg + sub
  int64_t ct;      // column tile; columns [ct*kTileCols, ...)
};

template <typename acc_t>
__device__ __forceinline__ Tile decode_tile(const TensorMeta<acc_t>& m, int64_t local) {
  Tile t;
  const int64_t rt = local / m.nct;
  t.ct = local - rt * m.nct;
  if (m.gpt > 0) {
    t.gb = rt * m.gpt;
    t.ge = imin(t.gb + m.gpt, m.groups);
    t.rb = t.gb * m.R;
    t.re = t.ge * m.R;
    t.chunk = 0;
  } else {
    const int64_t g = rt / m.tpg;
    const int64_t sub = rt - g * m.tpg;
    t.gb = g;
    t.ge = g + 1;
    t.rb = g * m.R + sub * kTileRows;
    t.re = imin(t.rb + kTileRows, (g + 1) * m.R);
    t.chunk = rt;  // == g*tpg + sub
  }
  return t;
}

// Result valid in lane 0; the fixed butterfly order keeps it deterministic.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Must be reached by the whole block (it synchronises). Result valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  acc_t tot = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < kWarps; ++i) tot += red[i];
  }
  __syncthreads();  // red may be reused by the caller's next iteration
  return tot;
}

// Squares of one row's slice of a column tile: the row sum goes to rowpart, the per-column squares
// are added to the caller's column accumulators. Called by a whole warp (it shuffles).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_squares(const scalar_t* __restrict__ w,
                                            const TensorMeta<acc_t>& m, int64_t k, int64_t ct,
                                            int lane, acc_t (&col)[kColsPerLane]) {
  const scalar_t* row = w + k * m.L;
  const int64_t cb = ct * kTileCols + lane;
  acc_t rs = 0;
#pragma unroll
  for (int i = 0; i < kColsPerLane; ++i) {
    const int64_t c = cb + 32 * i;
    if (c < m.L) {
      const acc_t v = static_cast<acc_t>(row[c]);
      const acc_t v2 = v * v;
      rs += v2;
      col[i] += v2;
    }
  }
  rs = warp_sum(rs);
  if (lane == 0) m.rowpart[k * m.nct + ct] = rs;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) gl_partials_kernel(Table<acc_t> tab, int64_t n_tiles) {
  __shared__ acc_t col_smem[kWarps][kTileCols];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t item = blockIdx.x; item < n_tiles; item += gridDim.x) {
    const int64_t t = find_tensor(tab.tile_start, tab.T, item);
    const TensorMeta<acc_t> m = tab.meta[t];
    const Tile tile = decode_tile(m, item - tab.tile_start[t]);
    const scalar_t* w = static_cast<const scalar_t*>(m.w);
    const int64_t cb = tile.ct * kTileCols + lane;
    // m.gpt depends only on the item, so the branch (and the barriers inside) is block-uniform.
    if (m.gpt > 0) {
      for (int64_t g = tile.gb + warp; g < tile.ge; g += kWarps) {
        acc_t col[kColsPerLane] = {};
        for (int64_t k = g * m.R; k < (g + 1) * m.R; ++k) row_squares(w, m, k, tile.ct, lane, col);
        acc_t* dst = m.colpart + g * m.L;  // tpg == 1: chunk index == g
#pragma unroll
        for (int i = 0; i < kColsPerLane; ++i) {
          if (cb + 32 * i < m.L) dst[cb + 32 * i] = col[i];
        }
      }
    } else {
      acc_t col[kColsPerLane] = {};
      for (int64_t k = tile.rb + warp; k < tile.re; k += kWarps) {
        row_squares(w, m, k, tile.ct, lane, col);
      }
#pragma unroll
      for (int i = 0; i < kColsPerLane; ++i) col_smem[warp][lane + 32 * i] = col[i];
      __syncthreads();
      if (threadIdx.x < kTileCols) {
        const int64_t c = tile.ct * kTileCols + threadIdx.x;
        if (c < m.L) {
          acc_t s = 0;
#pragma unroll
          for (int i = 0; i < kWarps; ++i) s += col_smem[i][threadIdx.x];
          m.colpart[tile.chunk * m.L + c] = s;
        }
      }
      __syncthreads();  // col_smem is rewritten by the next item
    }
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gl_finish_kernel(Table<acc_t> tab, int64_t n_items, acc_t lam, acc_t threshold,
                     acc_t* block_sums) {
  __shared__ acc_t red[kWarps];
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t t = find_tensor(tab.norm_start, tab.T, item);
    const TensorMeta<acc_t> m = tab.meta[t];
    const int64_t n = (item - tab.norm_start[t]) * kNormsPerBlock + threadIdx.x;
    acc_t norm = 0;
    if (n < m.K + m.groups * m.Cg) {
      acc_t ss = 0;
      const bool is_out = n < m.K;
      const int64_t idx = is_out ? n : n - m.K;
      if (is_out) {
        const acc_t* p = m.rowpart + n * m.nct;
        for (int64_t ct = 0; ct < m.nct; ++ct) ss += p[ct];
      } else {
        // in-channel c = g*Cg + j: its columns j*S .. j*S+S-1 in every chunk of group g.
        const int64_t g = idx / m.Cg, j = idx - g * m.Cg;
        const acc_t* p = m.colpart + g * m.tpg * m.L + j * m.S;
        for (int64_t sub = 0; sub < m.tpg; ++sub, p += m.L) {
          for (int64_t s = 0; s < m.S; ++s) ss += p[s];
        }
      }
      norm = sqrt(ss);
      acc_t* np = is_out ? m.norm_o : m.norm_i;
      if (np != nullptr) np[idx] = norm;
      acc_t* cp = is_out ? m.coef_o : m.coef_i;
      if (cp != nullptr) cp[idx] = lam * (norm == acc_t(0) ? acc_t(0) : acc_t(1) / norm);
      bool* kp = is_out ? m.keep_o : m.keep_i;
      if (kp != nullptr) kp[idx] = !(norm < threshold);
    }
    if (block_sums != nullptr) {  // kernel argument: block-uniform
      const acc_t s = block_sum(norm, red);
      if (threadIdx.x == 0) block_sums[item] = s;
    }
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gl_penalty_kernel(const acc_t* block_sums, int64_t n, acc_t lam, acc_t* penalty) {
  __shared__ acc_t red[kWarps];
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += block_sums[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) *penalty = s * lam;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gl_backward_coef_kernel(const acc_t* go, const acc_t* no, int64_t K, const acc_t* gi,
                            const acc_t* ni, int64_t C, acc_t* coef) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t n = first; n < K + C; n += stride) {
    const bool is_out = n < K;
    const acc_t g = is_out ? go[n] : gi[n - K];
    const acc_t x = is_out ? no[n] : ni[n - K];
    // grad * safe_reciprocal(norm) as in the reference: no 0/0 where norm == 0; NaN grads stay NaN.
    coef[n] = g * (x == acc_t(0) ? acc_t(0) : acc_t(1) / x);
  }
}

// Rounded multiply: keeps nvcc from fusing grad + W*coef into an FMA, so the update rounds like
// the reference's separate ops.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

enum class Apply { kGrad, kScale, kPrune };

template <typename scalar_t, typename acc_t, Apply mode>
__global__ void __launch_bounds__(kThreads) gl_apply_kernel(Table<acc_t> tab, int64_t n_tiles) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t item = blockIdx.x; item < n_tiles; item += gridDim.x) {
    const int64_t t = find_tensor(tab.tile_start, tab.T, item);
    const TensorMeta<acc_t> m = tab.meta[t];
    const Tile tile = decode_tile(m, item - tab.tile_start[t]);
    // A thread's columns are fixed for the whole tile: divide by S once, not per element.
    int64_t col[kColsPerLane], jj[kColsPerLane];
#pragma unroll
    for (int i = 0; i < kColsPerLane; ++i) {
      col[i] = tile.ct * kTileCols + lane + 32 * i;
      jj[i] = col[i] < m.L ? col[i] / m.S : -1;
    }
    scalar_t* w = static_cast<scalar_t*>(const_cast<void*>(m.w));
    scalar_t* out = static_cast<scalar_t*>(m.out);
    for (int64_t k = tile.rb + warp; k < tile.re; k += kWarps) {
      const int64_t cbase = (k / m.R) * m.Cg;  // first in-channel of row k's conv group
      const int64_t base = k * m.L;
      if constexpr (mode == Apply::kPrune) {
        const bool ko = m.keep_o[k];
#pragma unroll
        for (int i = 0; i < kColsPerLane; ++i) {
          // Store a zero rather than multiplying by 0: NaN*0 would stay NaN.
          if (jj[i] >= 0 && !(ko && m.keep_i[cbase + jj[i]])) {
            w[base + col[i]] = static_cast<scalar_t>(acc_t(0));
          }
        }
      } else {
        const acc_t co = m.coef_o[k];
#pragma unroll
        for (int i = 0; i < kColsPerLane; ++i) {
          if (jj[i] < 0) continue;
          const int64_t e = base + col[i];
          const acc_t upd = mul_rn(static_cast<acc_t>(w[e]), co + m.coef_i[cbase + jj[i]]);
          if constexpr (mode == Apply::kGrad) {
            out[e] = static_cast<scalar_t>(static_cast<acc_t>(out[e]) + upd);
          } else {
            out[e] = static_cast<scalar_t>(upd);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side

unsigned int grid_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>(n, std::numeric_limits<int32_t>::max()));
}

template <typename acc_t>
struct Plan {
  std::vector<TensorMeta<acc_t>> meta;
  std::vector<int64_t> tile_start{0}, norm_start{0};
  int64_t n_tiles() const { return tile_start.back(); }
  int64_t n_norm_items() const { return norm_start.back(); }
  at::Tensor workspace;  // partials (+ coefficients + block sums); freed stream-ordered
  acc_t* coef_base = nullptr;
  acc_t* block_sums = nullptr;
};

// Geometry, tiling and workspace of every tensor. Pointers to caller-owned outputs (norms, masks,
// grads) are filled in by the caller before upload().
template <typename acc_t>
Plan<acc_t> make_plan(at::TensorList weights, const std::vector<Geometry>& geo, bool need_partials,
                      bool want_coef, bool want_block_sums) {
  Plan<acc_t> p;
  const size_t T = weights.size();
  p.meta.resize(T);
  std::vector<int64_t> row_off(T), col_off(T), norm_off(T);
  int64_t rows_total = 0, cols_total = 0, norms_total = 0;
  for (size_t t = 0; t < T; ++t) {
    const Geometry& g = geo[t];
    TensorMeta<acc_t> m{};
    m.w = weights[t].const_data_ptr();
    m.K = g.K;
    m.Cg = g.Cg;
    m.S = g.S;
    m.L = g.row_len();
    m.R = g.rows_per_group();
    m.groups = g.groups;
    m.nct = ceil_div(m.L, kTileCols);
    int64_t nrt = 0;
    if (m.R == 0) {
      m.tpg = 0;  // no rows: in-norms sum zero chunks, so no partial is ever read unwritten
      m.gpt = 0;
    } else if (m.R >= kWarps) {
      m.tpg = ceil_div(m.R, kTileRows);
      m.gpt = 0;
      nrt = m.groups * m.tpg;
    } else {
      m.tpg = 1;
      m.gpt = kWarps * (kTileRows / (kWarps * m.R));
      nrt = ceil_div(m.groups, m.gpt);
    }
    row_off[t] = rows_total;
    col_off[t] = cols_total;
    norm_off[t] = norms_total;
    rows_total += m.K * m.nct;
    cols_total += m.groups * m.tpg * m.L;
    const int64_t n_norms = m.K + g.in_channels();
    norms_total += n_norms;
    p.tile_start.push_back(p.tile_start.back() + nrt * m.nct);
    p.norm_start.push_back(p.norm_start.back() + ceil_div(n_norms, kNormsPerBlock));
    p.meta[t] = m;
  }
  const int64_t coef_at = need_partials ? rows_total + cols_total : 0;
  const int64_t bsum_at = coef_at + (want_coef ? norms_total : 0);
  const int64_t ws_size = bsum_at + (want_block_sums ? p.n_norm_items() : 0);
  const auto ws_dtype = c10::CppTypeToScalarType<acc_t>::value;
  p.workspace = at::empty({ws_size}, weights[0].options().dtype(ws_dtype));
  acc_t* ws = p.workspace.template mutable_data_ptr<acc_t>();
  if (want_coef) p.coef_base = ws + coef_at;
  if (want_block_sums) p.block_sums = ws + bsum_at;
  for (size_t t = 0; t < T; ++t) {
    TensorMeta<acc_t>& m = p.meta[t];
    if (need_partials) {
      m.rowpart = ws + row_off[t];
      m.colpart = ws + rows_total + col_off[t];
    }
    if (want_coef) {
      m.coef_o = p.coef_base + norm_off[t];
      m.coef_i = m.coef_o + m.K;
    }
  }
  return p;
}

// Packs the table into pinned memory and queues its H2D copy on the current stream. copy_ records
// the stream on the pinned block, so the caching host allocator will not recycle it before the copy
// is done; the device copy is freed stream-ordered after the kernels that read it.
template <typename acc_t>
Table<acc_t> upload(const Plan<acc_t>& p, const at::Device& device, at::Tensor& device_buf) {
  const size_t T = p.meta.size();
  const size_t meta_bytes = T * sizeof(TensorMeta<acc_t>);
  const size_t idx_bytes = (T + 1) * sizeof(int64_t);
  static_assert(sizeof(TensorMeta<acc_t>) % alignof(int64_t) == 0, "table sections stay aligned");
  const int64_t total = static_cast<int64_t>(meta_bytes + 2 * idx_bytes);
  at::Tensor host = at::empty({total}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.mutable_data_ptr<uint8_t>();
  std::memcpy(h, p.meta.data(), meta_bytes);
  std::memcpy(h + meta_bytes, p.tile_start.data(), idx_bytes);
  std::memcpy(h + meta_bytes + idx_bytes, p.norm_start.data(), idx_bytes);
  device_buf = at::empty({total}, at::TensorOptions().dtype(at::kByte).device(device));
  device_buf.copy_(host, /*non_blocking=*/true);
  const uint8_t* d = device_buf.const_data_ptr<uint8_t>();
  return Table<acc_t>{reinterpret_cast<const TensorMeta<acc_t>*>(d),
                      reinterpret_cast<const int64_t*>(d + meta_bytes),
                      reinterpret_cast<const int64_t*>(d + meta_bytes + idx_bytes),
                      static_cast<int64_t>(T)};
}

// Kernels A and B: everything the list ops and the norms op share.
template <typename scalar_t, typename acc_t>
void launch_norms(const Plan<acc_t>& p, const Table<acc_t>& tab, cudaStream_t stream, acc_t lam,
                  acc_t threshold) {
  const int64_t tiles = p.n_tiles(), items = p.n_norm_items();
  if (tiles > 0) {
    gl_partials_kernel<scalar_t, acc_t><<<grid_for(tiles), kThreads, 0, stream>>>(tab, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (items > 0) {
    gl_finish_kernel<acc_t><<<grid_for(items), kThreads, 0, stream>>>(tab, items, lam, threshold,
                                                                      p.block_sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Kernel C; never launched with an empty grid.
template <typename scalar_t, typename acc_t, Apply mode>
void launch_apply(const Plan<acc_t>& p, const Table<acc_t>& tab, cudaStream_t stream) {
  const int64_t tiles = p.n_tiles();
  if (tiles == 0) return;
  gl_apply_kernel<scalar_t, acc_t, mode><<<grid_for(tiles), kThreads, 0, stream>>>(tab, tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    Plan<acc_t> p = make_plan<acc_t>(at::TensorList(w), {geo}, true, false, false);
    p.meta[0].norm_o = out_norms.mutable_data_ptr<acc_t>();
    p.meta[0].norm_i = in_norms.mutable_data_ptr<acc_t>();
    if (p.n_norm_items() == 0) return;  // no norm at all (K == 0 and in_channels == 0)
    at::Tensor table;
    const Table<acc_t> tab = upload(p, w.device(), table);
    launch_norms<scalar_t, acc_t>(p, tab, stream, acc_t(0), acc_t(0));
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
  at::Tensor grad_w = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gl_norms_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Plan<acc_t> p = make_plan<acc_t>(at::TensorList(w), {geo}, false, true, false);
    p.meta[0].out = grad_w.mutable_data_ptr<scalar_t>();
    if (p.n_tiles() == 0) return;  // no element to write (also covers K + in_channels == 0)
    const int64_t n = geo.K + geo.in_channels();
    gl_backward_coef_kernel<acc_t><<<grid_for(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
        grad_out_norms.const_data_ptr<acc_t>(), out_norms.const_data_ptr<acc_t>(), geo.K,
        grad_in_norms.const_data_ptr<acc_t>(), in_norms.const_data_ptr<acc_t>(), geo.in_channels(),
        p.coef_base);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor table;
    const Table<acc_t> tab = upload(p, w.device(), table);
    launch_apply<scalar_t, acc_t, Apply::kScale>(p, tab, stream);
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
    Plan<acc_t> p = make_plan<acc_t>(weights, geo, true, true, true);
    for (size_t i = 0; i < weights.size(); ++i) p.meta[i].out = grads[i].mutable_data_ptr();
    at::Tensor table;
    const Table<acc_t> tab = upload(p, weights[0].device(), table);
    const acc_t lam_acc = static_cast<acc_t>(lam);
    launch_norms<scalar_t, acc_t>(p, tab, stream, lam_acc, acc_t(0));
    // Always launched (one block) so that the penalty is written even when there are no norms.
    gl_penalty_kernel<acc_t><<<1, kThreads, 0, stream>>>(p.block_sums, p.n_norm_items(), lam_acc,
                                                         penalty.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_apply<scalar_t, acc_t, Apply::kGrad>(p, tab, stream);
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
  // The masks of all weights, concatenated (see the schema in csrc/ops.cpp).
  int64_t total_out = 0, total_in = 0;
  for (const auto& g : geo) {
    total_out += g.K;
    total_in += g.in_channels();
  }
  at::Tensor out_keep = at::empty({total_out}, bopts), in_keep = at::empty({total_in}, bopts);
  std::vector<int64_t> out_off(weights.size()), in_off(weights.size());
  int64_t oo = 0, io = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    out_off[i] = oo;
    in_off[i] = io;
    oo += geo[i].K;
    io += geo[i].in_channels();
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "group_lasso_prune_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Plan<acc_t> p = make_plan<acc_t>(weights, geo, true, false, false);
    for (size_t i = 0; i < weights.size(); ++i) {
      p.meta[i].w = weights[i].mutable_data_ptr();  // written: materialises a copy-on-write storage
      p.meta[i].keep_o = out_keep.mutable_data_ptr<bool>() + out_off[i];
      p.meta[i].keep_i = in_keep.mutable_data_ptr<bool>() + in_off[i];
    }
    if (p.n_norm_items() == 0) return;  // no norm, hence no element either
    at::Tensor table;
    const Table<acc_t> tab = upload(p, weights[0].device(), table);
    // Every norm is taken (A, B) before any element is zeroed (C), all on one stream.
    launch_norms<scalar_t, acc_t>(p, tab, stream, acc_t(0), static_cast<acc_t>(threshold));
    launch_apply<scalar_t, acc_t, Apply::kPrune>(p, tab, stream);
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
