// Multi-tensor launches shared by the list kernels (after NVIDIA apex multi_tensor_apply and
// torch's _foreach kernels): the metadata of a tensor list travels BY VALUE in the kernel's
// arguments, as one fixed-size TensorBatch of up to kCapacity tensors; a longer list is cut into
// consecutive batches, one launch each.
//
// Why by value: nothing is copied host-to-device, so a call can be captured in a CUDA graph (a
// captured copy from a pinned host buffer would replay whatever the recycled buffer then holds),
// and the launch costs no extra memcpy. The batch is sized to stay under 4 KiB, the kernel
// parameter limit of every architecture and driver (CUDA 12.1+ drivers allow ~32 KiB on Volta and
// newer; 4 KiB works everywhere and already holds tens of tensors).
//
// Inside a launch, each tensor has W kinds of work items (e.g. tiles and norm blocks); start[w] are
// the prefix sums of its items of kind w, and a block finds the tensor of its item by binary
// search, so a batch is O(#tensors), not O(#items), and one launch covers any number of items
// with a grid-stride loop. first[w] is the list-wide index of the batch's item 0 of kind w: a
// kernel whose per-item results go to one list-wide buffer (per-block partial sums, reduced by a
// later kernel) writes them at first[w] + item, so the buffer reads the same however the list was
// cut into launches.
//
// Kernels take the batch as `const __grid_constant__ Batch b`: it is read in place from parameter
// memory with the tensor index computed at run time, never copied to local memory (ptxas reports
// 0-byte stack frames for every kernel that takes one).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pyoptim {
namespace cuda {

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The kernel-parameter budget a TensorBatch is sized for (see the top of this file).
constexpr size_t kMaxParamBytes = 4096;

// Tensors per batch: what fits in kMaxParamBytes after the fixed part (head, first[W], the last
// start of each kind, count, and up to 8 bytes of tail padding). Per tensor: its Meta, W starts
// and one code byte.
template <typename Head, typename Meta, int W>
constexpr int batch_capacity() {
  constexpr size_t fixed = sizeof(Head) + 2 * W * sizeof(int64_t) + sizeof(int32_t) + 8;
  constexpr size_t per_tensor = sizeof(Meta) + W * sizeof(int64_t) + 1;
  return static_cast<int>((kMaxParamBytes - fixed) / per_tensor);
}

// Head: what every tensor of the launch shares (workspace bases, scalars). Meta: one tensor
// (pointers, sizes), trivially copyable. code: one byte per tensor for a small enum (a layout, a
// vector width), kept out of Meta so that it costs 1 byte, not 8 with padding.
template <typename Head, typename Meta, int W>
struct TensorBatch {
  static constexpr int kWork = W;
  static constexpr int kCapacity = batch_capacity<Head, Meta, W>();
  static_assert(kCapacity >= 1, "a TensorBatch must hold at least one tensor");

  Head head;
  Meta meta[kCapacity];
  int64_t start[W][kCapacity + 1];  // start[w][t]: this launch's first item of kind w in tensor t
  int64_t first[W];                 // list-wide index of this launch's item 0 of kind w
  int32_t count;                    // tensors in this launch, 1..kCapacity
  uint8_t code[kCapacity];

  __host__ __device__ __forceinline__ int64_t items(int w) const { return start[w][count]; }

  // Largest t with start[w][t] <= item, for 0 <= item < items(w): tensors without items of kind w
  // (equal consecutive starts) are skipped, so the answer always has item < start[w][t + 1].
  __host__ __device__ __forceinline__ int find(int w, int64_t item) const {
    const int64_t* s = start[w];
    int lo = 0, hi = count;
    while (hi - lo > 1) {
      const int mid = lo + (hi - lo) / 2;
      if (s[mid] <= item) lo = mid; else hi = mid;
    }
    return lo;
  }
};

// One tensor of a list as the host hands it to make_batches.
template <typename Meta, int W>
struct BatchEntry {
  Meta meta;
  uint8_t code = 0;
  std::array<int64_t, W> work{};  // items of each kind
};

// Cuts a list into consecutive batches of at most Batch::kCapacity tensors (an empty list gives
// none). Each batch is complete by value: the caller launches one kernel per batch that has items
// of the kernel's kind, all on one stream.
template <typename Batch, typename Head, typename Meta, int W>
std::vector<Batch> make_batches(const Head& head, const std::vector<BatchEntry<Meta, W>>& list) {
  static_assert(sizeof(Batch) <= kMaxParamBytes, "a TensorBatch must fit the kernel-parameter limit");
  static_assert(Batch::kWork == W, "work kinds of the entries and of the batch differ");
  std::vector<Batch> out;
  out.reserve((list.size() + Batch::kCapacity - 1) / Batch::kCapacity);
  std::array<int64_t, W> total{};
  for (size_t b0 = 0; b0 < list.size(); b0 += Batch::kCapacity) {
    const int n = static_cast<int>(std::min<size_t>(Batch::kCapacity, list.size() - b0));
    Batch b;
    std::memset(static_cast<void*>(&b), 0, sizeof(Batch));  // no stray bytes in the arguments
    b.head = head;
    b.count = n;
    for (int w = 0; w < W; ++w) {
      b.first[w] = total[w];
      b.start[w][0] = 0;
    }
    for (int t = 0; t < n; ++t) {
      const BatchEntry<Meta, W>& e = list[b0 + t];
      b.meta[t] = e.meta;
      b.code[t] = e.code;
      for (int w = 0; w < W; ++w) b.start[w][t + 1] = b.start[w][t] + e.work[w];
    }
    for (int w = 0; w < W; ++w) total[w] += b.start[w][n];
    out.push_back(b);
  }
  return out;
}

}  // namespace cuda
}  // namespace pyoptim
