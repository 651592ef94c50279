// Shape rules and input checks shared by the CPU and CUDA group-lasso kernels.
//
// A weight W of shape [K, Cg, *] (conv [K, C/groups, kh, kw], linear [K, C]) is seen as
// [groups, K/groups, Cg, S] with S the product of the trailing dims. Channel groups:
//   out-channel k           : W[k, :, :]                               -> out_norms[k],  K of them
//   in-channel  c = g*Cg + j: W[g*K/groups : (g+1)*K/groups, j, :]     -> in_norms[c],   groups*Cg
// For a depthwise conv (groups == K, Cg == 1) both groups of channel k are W[k]: the out- and the
// in-channel are the same channel, so its penalty counts twice, as the formula says.
//
// Layouts: a weight is contiguous, or (4-D) channels_last / (5-D) channels_last_3d. Either way each
// out-channel's row of L = Cg*S elements is contiguous at k*L; only the order inside the row
// differs: position j*S + s (contiguous) or s*Cg + j (channels-last). The kernels index through
// that, so the norms do not depend on the layout and in-place writes land where they should.
// A grad must be laid out like its weight.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/OptionalArrayRef.h>

#include "checks.h"

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace pyoptim {
namespace group_lasso {

struct Geometry {
  int64_t K = 0;       // output channels (dim 0)
  int64_t Cg = 0;      // input channels per group (dim 1)
  int64_t S = 1;       // product of the trailing (spatial) dims
  int64_t groups = 1;  // conv groups; in-channels = groups * Cg
  bool channels_last = false;  // row positions are s*Cg + j (else j*S + s)
  int64_t rows_per_group() const { return K / groups; }
  int64_t row_len() const { return Cg * S; }
  int64_t in_channels() const { return groups * Cg; }
  int64_t numel() const { return K * Cg * S; }
};

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// True for a 4-D channels_last or 5-D channels_last_3d tensor that is not also contiguous (a
// tensor that is both, e.g. a 1x1 conv's, has the same positions either way).
inline bool is_channels_last(const at::Tensor& t) {
  if (t.is_contiguous()) return false;
  if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (t.dim() == 5) return t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

inline const char* layout_name(const at::Tensor& w, bool channels_last) {
  if (!channels_last) return "contiguous";
  return w.dim() == 5 ? "channels_last_3d" : "channels_last";
}

inline Geometry check_weight(const at::Tensor& w, int64_t groups, const char* op,
                             const std::string& name) {
  TORCH_CHECK(w.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(is_supported_float(w.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", w.scalar_type());
  TORCH_CHECK(w.dim() >= 2, op, ": ", name,
              " must have at least 2 dims [out_channels, in_channels/groups, *], got shape ",
              w.sizes());
  TORCH_CHECK(w.layout() == at::kStrided, op, ": ", name, " must be a strided (dense) tensor");
  const bool cl = is_channels_last(w);
  TORCH_CHECK(w.is_contiguous() || cl, op, ": ", name,
              " must be contiguous, or channels_last (4-D) / channels_last_3d (5-D), got shape ",
              w.sizes(), " with strides ", w.strides(), " (call .contiguous())");
  TORCH_CHECK(groups >= 1, op, ": groups for ", name, " must be >= 1, got ", groups);
  Geometry g;
  g.K = w.size(0);
  g.Cg = w.size(1);
  g.S = 1;
  for (int64_t d = 2; d < w.dim(); ++d) g.S *= w.size(d);
  g.groups = groups;
  g.channels_last = cl;
  TORCH_CHECK(g.K % groups == 0, op, ": ", name, " has ", g.K,
              " output channels, not divisible by groups=", groups);
  return g;
}

inline int64_t groups_at(const at::OptionalIntArrayRef& groups, size_t i) {
  return groups.has_value() ? (*groups)[i] : 1;
}

// Checks the weight list (and the grad list when given) and returns each weight's geometry.
inline std::vector<Geometry> check_lists(at::TensorList weights, const at::TensorList* grads,
                                         const at::OptionalIntArrayRef& groups,
                                         const char* op) {
  if (grads != nullptr) {
    TORCH_CHECK(grads->size() == weights.size(), op, ": weights and grads must have the same length, got ",
                weights.size(), " weights and ", grads->size(), " grads");
  }
  if (groups.has_value()) {
    TORCH_CHECK(groups->size() == weights.size(), op,
                ": groups must have one entry per weight, got ", groups->size(), " for ",
                weights.size(), " weights");
  }
  std::vector<Geometry> geo;
  geo.reserve(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const std::string wname = "weights[" + std::to_string(i) + "]";
    geo.push_back(check_weight(weights[i], groups_at(groups, i), op, wname));
    TORCH_CHECK(weights[i].device() == weights[0].device(), op, ": ", wname, " is on ",
                weights[i].device(), " but weights[0] is on ", weights[0].device(),
                " (all tensors must be on one device)");
    TORCH_CHECK(weights[i].scalar_type() == weights[0].scalar_type(), op, ": ", wname,
                " has dtype ", weights[i].scalar_type(), " but weights[0] has ",
                weights[0].scalar_type(), " (all weights must share one dtype)");
    if (grads != nullptr) {
      const at::Tensor& g = (*grads)[i];
      const std::string gname = "grads[" + std::to_string(i) + "]";
      TORCH_CHECK(g.defined(), op, ": ", gname, " is undefined");
      TORCH_CHECK(g.device() == weights[i].device(), op, ": ", gname, " is on ", g.device(),
                  " but ", wname, " is on ", weights[i].device());
      TORCH_CHECK(g.scalar_type() == weights[i].scalar_type(), op, ": ", gname, " has dtype ",
                  g.scalar_type(), " but ", wname, " has ", weights[i].scalar_type());
      TORCH_CHECK(g.sizes() == weights[i].sizes(), op, ": ", gname, " has shape ", g.sizes(),
                  " but ", wname, " has ", weights[i].sizes());
      const bool cl = geo.back().channels_last;
      const bool same_layout =
          g.layout() == at::kStrided &&
          (!cl ? g.is_contiguous()
               : g.is_contiguous(g.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                              : at::MemoryFormat::ChannelsLast3d));
      TORCH_CHECK(same_layout, op, ": ", gname, " must be contiguous in the layout of ", wname, " (",
                  layout_name(weights[i], cl), "), got strides ", g.strides());
    }
  }
  return geo;
}

// Tensors a call writes must not share memory: the kernels update them in parallel. Sorting the
// [start, end) byte ranges keeps this O(n log n) on the host, with no device access.
inline void check_disjoint(at::TensorList ts, const char* op, const char* list_name) {
  std::vector<std::tuple<uintptr_t, uintptr_t, size_t>> spans;
  spans.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].numel() == 0) continue;
    const auto start = reinterpret_cast<uintptr_t>(ts[i].const_data_ptr());
    spans.emplace_back(start, start + ts[i].nbytes(), i);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    TORCH_CHECK(std::get<0>(spans[i]) >= std::get<1>(spans[i - 1]), op, ": ", list_name, "[",
                std::get<2>(spans[i]), "] and ", list_name, "[", std::get<2>(spans[i - 1]),
                "] share memory; each tensor written by one call must be distinct");
  }
}

inline void check_norms_backward(const at::Tensor& grad_out_norms, const at::Tensor& grad_in_norms,
                                 const at::Tensor& w, const at::Tensor& out_norms,
                                 const at::Tensor& in_norms, const Geometry& g) {
  const char* op = "group_lasso_norms_backward";
  const auto nd = acc_dtype(w.scalar_type());
  auto check_vec = [&](const at::Tensor& t, const char* name, int64_t n) {
    TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n,
                "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == nd, op, ": ", name, " must have dtype ", nd, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == w.device(), op, ": ", name, " is on ", t.device(),
                " but w is on ", w.device());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  };
  check_vec(grad_out_norms, "grad_out_norms", g.K);
  check_vec(grad_in_norms, "grad_in_norms", g.in_channels());
  check_vec(out_norms, "out_norms", g.K);
  check_vec(in_norms, "in_norms", g.in_channels());
}

}  // namespace group_lasso
}  // namespace pyoptim
