// CPU kernel of channel_compact: every output row of every tensor of the list is one memcpy of a
// kept input row; all rows of all tensors are split over the threads in one parallel loop.
#include "../channel_compact.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace pyoptim {
namespace channel_compact {
namespace {

std::vector<at::Tensor> channel_compact_cpu(at::TensorList tensors, at::IntArrayRef dims,
                                            at::TensorList indices) {
  const char* op = "channel_compact";
  const auto geo = check(tensors, dims, indices, op);
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device().is_cpu(), op, ": tensors[", i, "] must be a CPU tensor for the "
                "CPU kernel, got ", tensors[i].device());
    const int64_t* idx = indices[i].const_data_ptr<int64_t>();
    for (int64_t j = 0; j < geo[i].k; ++j) {
      TORCH_CHECK(idx[j] >= 0 && idx[j] < geo[i].size, op, ": indices[", i, "][", j, "]=", idx[j],
                  " is out of range for dim ", geo[i].dim, " of size ", geo[i].size);
    }
  }
  auto out = alloc_outputs(tensors, geo);
  // prefix sums of output rows, so one flat loop covers the whole list
  std::vector<int64_t> start(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) start[i + 1] = start[i] + geo[i].outer * geo[i].k;
  const int64_t rows = start.back();
  if (rows == 0) return out;
  const int64_t avg_bytes = 1 + [&] {
    int64_t b = 0;
    for (size_t i = 0; i < tensors.size(); ++i) b += geo[i].outer * geo[i].k * geo[i].inner_bytes;
    return b / rows;
  }();
  const int64_t grain = std::max<int64_t>(1, (int64_t(64) << 10) / avg_bytes);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t r = begin; r < end; ++r) {
      while (r >= start[t + 1]) ++t;
      const Geometry& g = geo[t];
      const int64_t local = r - start[t];
      const int64_t o = local / g.k, j = local - o * g.k;
      const int64_t src_row = indices[t].const_data_ptr<int64_t>()[j];
      const auto* src = static_cast<const char*>(tensors[t].const_data_ptr()) +
                        (o * g.size + src_row) * g.inner_bytes;
      auto* dst = static_cast<char*>(out[t].mutable_data_ptr()) + (o * g.k + j) * g.inner_bytes;
      std::memcpy(dst, src, static_cast<size_t>(g.inner_bytes));
    }
  });
  return out;
}

}  // namespace
}  // namespace channel_compact
}  // namespace pyoptim

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  m.impl("channel_compact", &pyoptim::channel_compact::channel_compact_cpu);
}
