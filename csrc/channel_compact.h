// Shape rules and input checks of channel_compact, shared by the CPU and CUDA kernels.
//
// channel_compact(tensors, dims, indices)[i] == tensors[i].index_select(dims[i], indices[i]).
// Every tensor is seen as [outer, size, inner] around its dim; the output is [outer, k, inner]
// with k = indices[i].numel(). The kernels copy bytes, so any dtype works.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace pyoptim {
namespace channel_compact {

struct Geometry {
  int64_t outer = 1;       // product of the dims before `dim`
  int64_t size = 0;        // extent of `dim`
  int64_t inner_bytes = 0; // bytes of one slice of the dims after `dim`
  int64_t k = 0;           // kept indices
  int64_t dim = 0;         // normalised dim
};

inline std::vector<Geometry> check(at::TensorList tensors, at::IntArrayRef dims,
                                   at::TensorList indices, const char* op) {
  TORCH_CHECK(tensors.size() == dims.size() && tensors.size() == indices.size(), op,
              ": tensors, dims and indices must have the same length, got ", tensors.size(), ", ",
              dims.size(), " and ", indices.size());
  std::vector<Geometry> geo;
  geo.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const at::Tensor& idx = indices[i];
    const std::string tn = "tensors[" + std::to_string(i) + "]";
    const std::string in = "indices[" + std::to_string(i) + "]";
    TORCH_CHECK(t.defined(), op, ": ", tn, " is undefined");
    TORCH_CHECK(t.layout() == at::kStrided && t.is_contiguous(), op, ": ", tn,
                " must be a contiguous strided tensor (call .contiguous())");
    TORCH_CHECK(t.dim() >= 1, op, ": ", tn, " must have at least 1 dim");
    TORCH_CHECK(t.device() == tensors[0].device(), op, ": ", tn, " is on ", t.device(),
                " but tensors[0] is on ", tensors[0].device());
    const int64_t d = dims[i] < 0 ? dims[i] + t.dim() : dims[i];
    TORCH_CHECK(d >= 0 && d < t.dim(), op, ": dims[", i, "]=", dims[i], " is out of range for ", tn,
                " of ", t.dim(), " dims");
    TORCH_CHECK(idx.defined() && idx.scalar_type() == at::kLong && idx.dim() == 1, op, ": ", in,
                " must be a 1-D int64 tensor, got ", idx.defined() ? c10::toString(idx.scalar_type()) : "undefined",
                " of shape ", idx.defined() ? idx.sizes() : at::IntArrayRef{});
    TORCH_CHECK(idx.is_contiguous(), op, ": ", in, " must be contiguous");
    TORCH_CHECK(idx.device() == t.device(), op, ": ", in, " is on ", idx.device(), " but ", tn,
                " is on ", t.device());
    Geometry g;
    g.dim = d;
    g.size = t.size(d);
    for (int64_t j = 0; j < d; ++j) g.outer *= t.size(j);
    int64_t inner = 1;
    for (int64_t j = d + 1; j < t.dim(); ++j) inner *= t.size(j);
    g.inner_bytes = inner * static_cast<int64_t>(t.element_size());
    g.k = idx.numel();
    geo.push_back(g);
  }
  return geo;
}

inline std::vector<at::Tensor> alloc_outputs(at::TensorList tensors, const std::vector<Geometry>& geo) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    auto sizes = tensors[i].sizes().vec();
    sizes[geo[i].dim] = geo[i].k;
    out.push_back(at::empty(sizes, tensors[i].options()));
  }
  return out;
}

}  // namespace channel_compact
}  // namespace pyoptim
