// Device side of the CUDA group-lasso kernels (host side and launch structure: group_lasso.cu).
//
// Every weight is a [K, L = Cg*S] row-major matrix: each out-channel's row is contiguous, in both
// supported layouts. Only the order inside a row differs, and with it the in-channel of a column:
//   contiguous (NCHW)        column p = j*S + s   ->  in-channel slot j = p / S
//   channels_last(_3d)       column p = s*Cg + j  ->  in-channel slot j = p % Cg
// Row sums and per-column partial sums are therefore layout-blind; the layout only changes which
// columns the finish kernel gathers into an in-channel norm and which coefficient the apply kernel
// reads for a column (the batch's code byte, kChannelsLast).
#pragma once

#include <cstdint>

#include "multi_tensor.cuh"

namespace pyoptim {
namespace group_lasso {
namespace gpu {

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

// What a launch's tensors share. Per-tensor values live at base + the tensor's o_off (one per
// out-channel) or i_off (one per in-channel); a null base means "not wanted by this op".
template <typename acc_t>
struct Head {
  acc_t* ws = nullptr;          // partial sums of the whole list
  acc_t* norm_o = nullptr;      // norms (group_lasso_norms)
  acc_t* norm_i = nullptr;
  acc_t* coef_o = nullptr;      // lam/norm (grad_) or grad/norm (norms_backward)
  acc_t* coef_i = nullptr;
  bool* keep_o = nullptr;       // keep masks (prune_)
  bool* keep_i = nullptr;
  acc_t* block_sums = nullptr;  // per norm block, list-wide index (grad_'s penalty)
  acc_t lam = 0;
  acc_t threshold = 0;
};

// One weight, by value. L = Cg*S and the tiling are derived by tiling() on host and device alike.
struct TensorMeta {
  const void* w;   // weight (written by prune_)
  void* out;       // grad (grad_) or result (norms_backward)
  int64_t part;    // row partials [K, nct] at ws + part, column partials [groups*tpg, L] after them
  int64_t o_off;   // its first out-channel in norm_o / coef_o / keep_o
  int64_t i_off;   // its first in-channel in norm_i / coef_i / keep_i
  int64_t K, Cg, S, groups;
};

constexpr int kTiles = 0;      // work kinds: tiles of the partials and apply kernels,
constexpr int kNormBlocks = 1; // blocks of kNormsPerBlock norms of the finish kernel
constexpr uint8_t kChannelsLast = 1;  // code byte: the weight (and its grad) are channels_last

template <typename acc_t>
using Batch = cuda::TensorBatch<Head<acc_t>, TensorMeta, 2>;

// Row tiles never mix conv groups in the column partials:
//  * shared mode (R = K/groups >= kWarps): a row tile is a chunk of <= 64 rows of ONE group; all
//    warps work on it and their column sums are merged in shared memory. A group has
//    tpg = ceil(R/64) chunks, and the column partials are indexed by chunk = g*tpg + sub.
//  * packed mode (1 <= R < kWarps, e.g. depthwise R == 1): a row tile holds gpt whole groups, and
//    each group is owned by one warp, which writes its column sums directly (tpg == 1). Shared
//    mode there would leave most warps idle with R rows per tile.
struct Tiling {
  int64_t L, R;
  int64_t nct;  // column tiles
  int64_t tpg;  // column-partial chunks per group (0 when R == 0)
  int64_t gpt;  // groups per row tile in packed mode, 0 in shared mode
  int64_t nrt;  // row tiles
};

__host__ __device__ __forceinline__ Tiling tiling(const TensorMeta& m) {
  Tiling t;
  t.L = m.Cg * m.S;
  t.R = m.K / m.groups;
  t.nct = cuda::ceil_div(t.L, kTileCols);
  if (t.R == 0) {
    t.tpg = t.gpt = t.nrt = 0;  // no rows: in-norms sum zero chunks, no partial read unwritten
  } else if (t.R >= kWarps) {
    t.tpg = cuda::ceil_div(t.R, kTileRows);
    t.gpt = 0;
    t.nrt = m.groups * t.tpg;
  } else {
    t.tpg = 1;
    t.gpt = kWarps * (kTileRows / (kWarps * t.R));
    t.nrt = cuda::ceil_div(m.groups, t.gpt);
  }
  return t;
}

// One tensor as the kernels use it (registers).
template <typename acc_t>
struct View {
  const void* w;
  void* out;
  acc_t* rowpart;  // [K, nct]
  acc_t* colpart;  // [groups*tpg, L]
  int64_t o_off, i_off, K, Cg, S, groups;
  int64_t L, R, nct, tpg, gpt;
  bool cl;
};

template <typename acc_t>
__device__ __forceinline__ View<acc_t> view_of(const Batch<acc_t>& b, int t) {
  const TensorMeta m = b.meta[t];
  const Tiling tl = tiling(m);
  View<acc_t> v;
  v.w = m.w;
  v.out = m.out;
  v.rowpart = b.head.ws == nullptr ? nullptr : b.head.ws + m.part;
  v.colpart = v.rowpart == nullptr ? nullptr : v.rowpart + m.K * tl.nct;
  v.o_off = m.o_off;
  v.i_off = m.i_off;
  v.K = m.K;
  v.Cg = m.Cg;
  v.S = m.S;
  v.groups = m.groups;
  v.L = tl.L;
  v.R = tl.R;
  v.nct = tl.nct;
  v.tpg = tl.tpg;
  v.gpt = tl.gpt;
  v.cl = b.code[t] == kChannelsLast;
  return v;
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

struct Tile {
  int64_t rb, re;  // rows [rb, re)
  int64_t gb, ge;  // packed mode: groups [gb, ge)
  int64_t chunk;   // shared mode: column-partial chunk g*tpg + sub
  int64_t ct;      // column tile; columns [ct*kTileCols, ...)
};

template <typename acc_t>
__device__ __forceinline__ Tile decode_tile(const View<acc_t>& m, int64_t local) {
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
__device__ __forceinline__ void row_squares(const scalar_t* __restrict__ w, const View<acc_t>& m,
                                            int64_t k, int64_t ct, int lane,
                                            acc_t (&col)[kColsPerLane]) {
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

// A: one block per tile (grid-stride) of any tensor of the batch; row sums of squares per
// (row, column tile), column sums per (row chunk of one conv group, column).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gl_partials_kernel(const __grid_constant__ Batch<acc_t> b) {
  __shared__ acc_t col_smem[kWarps][kTileCols];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n_tiles = b.items(kTiles);
  for (int64_t item = blockIdx.x; item < n_tiles; item += gridDim.x) {
    const int t = b.find(kTiles, item);
    const View<acc_t> m = view_of(b, t);
    const Tile tile = decode_tile(m, item - b.start[kTiles][t]);
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

// Sum of squares of norm n of a tensor (n < K: out-channel n; else in-channel n - K), from A's
// partials, in a fixed order.
template <typename acc_t>
__device__ __forceinline__ acc_t norm_squared(const View<acc_t>& m, int64_t n) {
  acc_t ss = 0;
  if (n < m.K) {
    const acc_t* p = m.rowpart + n * m.nct;
    for (int64_t ct = 0; ct < m.nct; ++ct) ss += p[ct];
  } else {
    // in-channel c = g*Cg + j: its S columns (j*S + s, or s*Cg + j when channels_last) in every
    // chunk of group g.
    const int64_t c = n - m.K;
    const int64_t g = c / m.Cg, j = c - g * m.Cg;
    const int64_t step = m.cl ? m.Cg : 1;
    const acc_t* p = m.colpart + g * m.tpg * m.L + (m.cl ? j : j * m.S);
    for (int64_t sub = 0; sub < m.tpg; ++sub, p += m.L) {
      for (int64_t s = 0; s < m.S; ++s) ss += p[s * step];
    }
  }
  return ss;
}

// B: one thread per norm; sums its partials, sqrt, then writes what the op needs: norms, lam/norm
// coefficients, keep masks, per-block norm sums (at the list-wide block index).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) gl_finish_kernel(const __grid_constant__ Batch<acc_t> b) {
  __shared__ acc_t red[kWarps];
  const Head<acc_t>& h = b.head;
  const int64_t n_items = b.items(kNormBlocks);
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int t = b.find(kNormBlocks, item);
    const View<acc_t> m = view_of(b, t);
    const int64_t n = (item - b.start[kNormBlocks][t]) * kNormsPerBlock + threadIdx.x;
    acc_t norm = 0;
    if (n < m.K + m.groups * m.Cg) {
      norm = sqrt(norm_squared(m, n));
      const bool is_out = n < m.K;
      const int64_t idx = is_out ? m.o_off + n : m.i_off + (n - m.K);  // list-wide channel
      acc_t* np = is_out ? h.norm_o : h.norm_i;
      if (np != nullptr) np[idx] = norm;
      acc_t* cp = is_out ? h.coef_o : h.coef_i;
      if (cp != nullptr) cp[idx] = h.lam * (norm == acc_t(0) ? acc_t(0) : acc_t(1) / norm);
      bool* kp = is_out ? h.keep_o : h.keep_i;
      if (kp != nullptr) kp[idx] = !(norm < h.threshold);
    }
    if (h.block_sums != nullptr) {  // the same for every thread: block-uniform
      const acc_t s = block_sum(norm, red);
      if (threadIdx.x == 0) h.block_sums[b.first[kNormBlocks] + item] = s;
    }
  }
}

// D: a single block sums B's per-block sums of the whole list in a fixed order, times lam.
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

// C: same tiles as A; grad += W*(co+ci), out = W*(co+ci), or prune-to-zero, through the row's
// memory order (columns map to in-channels by the tensor's layout).
template <typename scalar_t, typename acc_t, Apply mode>
__global__ void __launch_bounds__(kThreads) gl_apply_kernel(const __grid_constant__ Batch<acc_t> b) {
  const Head<acc_t>& h = b.head;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n_tiles = b.items(kTiles);
  for (int64_t item = blockIdx.x; item < n_tiles; item += gridDim.x) {
    const int t = b.find(kTiles, item);
    const View<acc_t> m = view_of(b, t);
    const Tile tile = decode_tile(m, item - b.start[kTiles][t]);
    // A thread's columns are fixed for the whole tile: map them to in-channel slots once.
    int64_t col[kColsPerLane], jj[kColsPerLane];
#pragma unroll
    for (int i = 0; i < kColsPerLane; ++i) {
      col[i] = tile.ct * kTileCols + lane + 32 * i;
      jj[i] = col[i] >= m.L ? -1 : (m.cl ? col[i] % m.Cg : col[i] / m.S);
    }
    scalar_t* w = static_cast<scalar_t*>(const_cast<void*>(m.w));
    scalar_t* out = static_cast<scalar_t*>(m.out);
    for (int64_t k = tile.rb + warp; k < tile.re; k += kWarps) {
      const int64_t cbase = m.i_off + (k / m.R) * m.Cg;  // first in-channel of row k's conv group
      const int64_t base = k * m.L;
      if constexpr (mode == Apply::kPrune) {
        const bool ko = h.keep_o[m.o_off + k];
#pragma unroll
        for (int i = 0; i < kColsPerLane; ++i) {
          // Store a zero rather than multiplying by 0: NaN*0 would stay NaN.
          if (jj[i] >= 0 && !(ko && h.keep_i[cbase + jj[i]])) {
            w[base + col[i]] = static_cast<scalar_t>(acc_t(0));
          }
        }
      } else {
        const acc_t co = h.coef_o[m.o_off + k];
#pragma unroll
        for (int i = 0; i < kColsPerLane; ++i) {
          if (jj[i] < 0) continue;
          const int64_t e = base + col[i];
          const acc_t upd = mul_rn(static_cast<acc_t>(w[e]), co + h.coef_i[cbase + jj[i]]);
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

}  // namespace gpu
}  // namespace group_lasso
}  // namespace pyoptim
