// CUDA kernel of channel_compact, for the CUDA key.
//
// channel_compact(tensors, dims, indices)[i] == tensors[i].index_select(dims[i], indices[i]).
// Every tensor is a [outer, size, inner] byte array (csrc/channel_compact.h); its output is
// [outer, k, inner], and output row r = (o, j) is input row (o, indices[i][j]): one contiguous
// chunk of inner_bytes bytes. The kernel copies bytes, so any dtype works.
//
// Launch structure (after NVIDIA apex multi_tensor_apply and torch's _foreach kernels).
//   host : per-tensor metadata (pointers and tiling) goes BY VALUE in the kernel's arguments, in
//          batches of up to Batch::kCapacity tensors (multi_tensor.cuh; 4 KiB of arguments): one
//          launch for a list that fits, consecutive launches for a longer one (the tensors are
//          independent, so nothing spans launches). Nothing is copied host-to-device, so a call can
//          be captured in a CUDA graph. Tensors with nothing to copy are left out. A block finds
//          its tensor by binary search over prefix sums of each tensor's tiles.
//   cc_copy_kernel : one block per tile (grid-stride). Rows are split into units of V bytes,
//          V = the widest of 16/8/4/2/1 that divides inner_bytes and both base pointers (the
//          batch's code byte holds log2 V). A tile is either rpt >= 1 whole rows of <= kTileUnits
//          units in all, or (a long row) one chunk of <= kTileUnits units of one row. The block
//          first resolves the source row of each of its rows (one index load and range check per
//          row, into shared memory), then copies its units with consecutive threads on
//          consecutive units (coalesced).
// Out-of-range indices trip CUDA_KERNEL_ASSERT on the device (no host sync); the offending rows
// are never read, even where device asserts are compiled out. Like CUDA index_select, indices are
// only looked at where the output has bytes to write.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../channel_compact.h"
#include "multi_tensor.cuh"

namespace pyoptim {
namespace channel_compact {
namespace {

// 256 threads, 4 units each per tile: 16 KiB per tile with 16-byte units.
constexpr int kThreads = 256;
constexpr int kUnitsPerThread = 4;
constexpr int kTileUnits = kThreads * kUnitsPerThread;

struct TensorMeta {
  const char* src;    // input, [outer, size, row_bytes]
  char* dst;          // output, [outer, k, row_bytes]
  const int64_t* idx; // [k]
  int64_t k;          // kept indices
  int64_t size;       // extent of the selected dim
  int64_t row_bytes;  // inner_bytes (> 0)
  int64_t rows;       // output rows, outer * k (> 0)
  int64_t rpt;        // rows per tile (1 for long rows)
};
struct Head {};  // nothing shared beyond the tensors

using Batch = cuda::TensorBatch<Head, TensorMeta, 1>;
using cuda::ceil_div;

template <int V> struct Unit;
template <> struct Unit<16> { using type = uint4; };
template <> struct Unit<8> { using type = uint2; };
template <> struct Unit<4> { using type = uint32_t; };
template <> struct Unit<2> { using type = uint16_t; };
template <> struct Unit<1> { using type = uint8_t; };

// Copies the tile's nr rows x w units (units [ub, ub + w) of each row). src_rows[rl] is the source
// row of the tile's row rl, nullptr for an out-of-range index. nr * w <= kTileUnits.
template <int V>
__device__ __forceinline__ void copy_tile(const char* const* src_rows, char* dst_row0,
                                          int64_t row_bytes, int nr, int w, int64_t ub) {
  using U = typename Unit<V>::type;
  const int n = nr * w;
  U buf[kUnitsPerThread];
  U* dst[kUnitsPerThread];
  // All loads first, then all stores: kUnitsPerThread independent loads in flight per thread.
#pragma unroll
  for (int i = 0; i < kUnitsPerThread; ++i) {
    const int e = static_cast<int>(threadIdx.x) + i * kThreads;
    dst[i] = nullptr;
    if (e < n) {
      const int rl = nr == 1 ? 0 : e / w;
      const int64_t u = ub + (e - rl * w);
      const char* s = src_rows[rl];
      if (s != nullptr) {
        buf[i] = reinterpret_cast<const U*>(s)[u];
        dst[i] = reinterpret_cast<U*>(dst_row0 + rl * row_bytes) + u;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kUnitsPerThread; ++i) {
    if (dst[i] != nullptr) *dst[i] = buf[i];
  }
}

__global__ void __launch_bounds__(kThreads) cc_copy_kernel(const __grid_constant__ Batch b) {
  __shared__ const char* src_rows[kTileUnits];  // rpt <= kTileUnits
  const int64_t n_tiles = b.items(0);
  for (int64_t item = blockIdx.x; item < n_tiles; item += gridDim.x) {
    const int t = b.find(0, item);
    const TensorMeta m = b.meta[t];
    const int vec_log2 = b.code[t];
    const int64_t units = m.row_bytes >> vec_log2;
    const int64_t cpr = ceil_div(units, kTileUnits);  // tiles per row (chunks; 1 unless rpt == 1)
    const int64_t local = item - b.start[0][t];
    const int64_t rt = local / cpr;
    const int64_t c = local - rt * cpr;
    const int64_t row0 = rt * m.rpt;
    const int nr = static_cast<int>(m.rpt < m.rows - row0 ? m.rpt : m.rows - row0);
    const int64_t ub = c * kTileUnits;
    const int w = static_cast<int>(units - ub < kTileUnits ? units - ub : kTileUnits);
    for (int rl = static_cast<int>(threadIdx.x); rl < nr; rl += kThreads) {
      const int64_t r = row0 + rl;
      const int64_t o = r / m.k;
      const int64_t s = m.idx[r - o * m.k];
      const bool in_range = s >= 0 && s < m.size;
      CUDA_KERNEL_ASSERT(in_range && "channel_compact: index out of range");
      src_rows[rl] = in_range ? m.src + (o * m.size + s) * m.row_bytes : nullptr;
    }
    __syncthreads();
    char* dst_row0 = m.dst + row0 * m.row_bytes;
    // vec_log2 depends only on the item: the branch is block-uniform.
    switch (vec_log2) {
      case 4: copy_tile<16>(src_rows, dst_row0, m.row_bytes, nr, w, ub); break;
      case 3: copy_tile<8>(src_rows, dst_row0, m.row_bytes, nr, w, ub); break;
      case 2: copy_tile<4>(src_rows, dst_row0, m.row_bytes, nr, w, ub); break;
      case 1: copy_tile<2>(src_rows, dst_row0, m.row_bytes, nr, w, ub); break;
      default: copy_tile<1>(src_rows, dst_row0, m.row_bytes, nr, w, ub); break;
    }
    __syncthreads();  // src_rows is rewritten by the next item
  }
}

// ------------------------------------------------------------------------------------------------
// Host side

unsigned int grid_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>(n, std::numeric_limits<int32_t>::max()));
}

// log2 of the widest unit (16, 8, 4, 2 or 1 bytes) that divides the row length and both base
// pointers (hence every row start).
uint8_t unit_width_log2(const void* src, const void* dst, int64_t row_bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                      static_cast<uintptr_t>(row_bytes);
  for (uint8_t l = 4; l > 0; --l) {
    if ((a & ((uintptr_t(1) << l) - 1)) == 0) return l;
  }
  return 0;
}

std::vector<at::Tensor> channel_compact_cuda(at::TensorList tensors, at::IntArrayRef dims,
                                             at::TensorList indices) {
  const char* op = "channel_compact";
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(!tensors[i].defined() || tensors[i].is_cuda(), op, ": tensors[", i,
                "] must be a CUDA tensor, got one on ", tensors[i].device());
  }
  const std::vector<Geometry> geo = check(tensors, dims, indices, op);
  if (tensors.empty()) return {};
  c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> out = alloc_outputs(tensors, geo);

  std::vector<cuda::BatchEntry<TensorMeta, 1>> list;
  list.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Geometry& g = geo[i];
    const int64_t rows = g.outer * g.k;
    if (rows == 0 || g.inner_bytes == 0) continue;  // empty output: nothing to copy
    cuda::BatchEntry<TensorMeta, 1> e;
    TensorMeta& m = e.meta;
    m.src = static_cast<const char*>(tensors[i].const_data_ptr());
    m.dst = static_cast<char*>(out[i].mutable_data_ptr());
    m.idx = indices[i].const_data_ptr<int64_t>();
    m.k = g.k;
    m.size = g.size;
    m.row_bytes = g.inner_bytes;
    m.rows = rows;
    e.code = unit_width_log2(m.src, m.dst, m.row_bytes);
    const int64_t units = m.row_bytes >> e.code;
    m.rpt = units >= kTileUnits ? 1 : kTileUnits / units;
    e.work[0] = ceil_div(rows, m.rpt) * ceil_div(units, kTileUnits);
    list.push_back(e);
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const Batch& b : cuda::make_batches<Batch>(Head{}, list)) {
    cc_copy_kernel<<<grid_for(b.items(0)), kThreads, 0, stream>>>(b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace
}  // namespace channel_compact
}  // namespace pyoptim

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("channel_compact", &pyoptim::channel_compact::channel_compact_cuda);
}
