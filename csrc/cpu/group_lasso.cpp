// CPU kernels of the group-lasso family (PruneTrain's regulariser).
//
// A call works on a list of weights in cache-sized batches of tensors. For each batch:
//   1. partial sums: the rows of all tensors of the batch are cut into items of ~32K elements and
//      the items into one contiguous range per thread. A range squares each row once, writing the
//      row's sum (the out-channel norm^2) and adding the squares position by position into a
//      per-range column buffer [groups, Cg*S] (the in-channel partials). Rows are contiguous, so
//      every inner loop is a unit-stride loop the compiler vectorises.
//   2. finish (serial, O(channels)): in-channel sums over ranges and over s, square roots, the
//      penalty, and per-position coefficients (lam/||in-channel||, or keep flags for pruning).
//   3. apply: grad[k, p] += w[k, p] * (coef_out[k] + coef_pos[p]), parallel over items.
// Positions p are memory order within a row, so passes 1 and 3 are layout-blind; a channels_last
// weight (and grad) only changes which positions the finish step gathers per in-channel.
// A batch (~1 MB of weights, or one larger tensor) is still in cache when step 3 reads it again, so a call
// moves close to 3 passes over memory instead of 4. Results are deterministic: the split into
// ranges depends only on the shapes and the thread count, and the reduction order is fixed.
#include "../group_lasso.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace pyoptim {
namespace group_lasso {
namespace {

// Hot loops as plain functions on float/double with runtime ISA selection (x86-64 baseline is
// SSE2 only; the extension is built once for every machine).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PYOPTIM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYOPTIM_CLONES
#endif

#define PYOPTIM_DEFINE_ROW_KERNELS(T)                                                          \
  /* col[p] += w[p]^2 for the row; returns sum_p w[p]^2 */                                     \
  PYOPTIM_CLONES T row_square_accumulate(const T* __restrict w, T* __restrict col, int64_t n) { \
    T row = 0;                                                                                 \
    _Pragma("omp simd reduction(+ : row)") for (int64_t p = 0; p < n; ++p) {                   \
      const T q = w[p] * w[p];                                                                 \
      col[p] += q;                                                                             \
      row += q;                                                                                \
    }                                                                                          \
    return row;                                                                                \
  }                                                                                            \
  /* out[p] (+)= w[p] * (a + pc[p]) */                                                         \
  PYOPTIM_CLONES void row_scale(T* __restrict out, const T* __restrict w,                      \
                                const T* __restrict pc, T a, int64_t n, bool accumulate) {     \
    if (accumulate) {                                                                          \
      _Pragma("omp simd") for (int64_t p = 0; p < n; ++p) out[p] += w[p] * (a + pc[p]);        \
    } else {                                                                                   \
      _Pragma("omp simd") for (int64_t p = 0; p < n; ++p) out[p] = w[p] * (a + pc[p]);         \
    }                                                                                          \
  }                                                                                            \
  /* w[p] = keep[p] ? w[p] : 0 (a select, so a NaN in a kept group stays NaN) */               \
  PYOPTIM_CLONES void row_select(T* __restrict w, const uint8_t* __restrict keep, int64_t n) { \
    _Pragma("omp simd") for (int64_t p = 0; p < n; ++p) w[p] = keep[p] ? w[p] : T(0);          \
  }

PYOPTIM_DEFINE_ROW_KERNELS(float)
PYOPTIM_DEFINE_ROW_KERNELS(double)
#undef PYOPTIM_DEFINE_ROW_KERNELS

template <typename T>
void row_select_generic(T* w, const uint8_t* keep, int64_t n) {
  for (int64_t p = 0; p < n; ++p) w[p] = keep[p] ? w[p] : T(0);
}

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
template <typename scalar_t>
constexpr bool kNeedsConvert = !std::is_same_v<scalar_t, acc_t<scalar_t>>;

template <typename acc>
inline acc safe_reciprocal(acc x) {
  return x == acc(0) ? acc(0) : acc(1) / x;  // subgradient 0 at a zero group; NaN stays NaN
}

// In-channel c = g*Cg + j of a weight owns S positions of its conv group's [Cg*S] row block:
// first_position(c) + q*position_step for q < S. Rows are contiguous in both layouts; only the
// positions inside a row differ (j*S + s contiguous, s*Cg + j channels_last).
inline int64_t first_position(const Geometry& g, int64_t c) {
  const int64_t j = c % g.Cg;
  return (c / g.Cg) * g.row_len() + (g.channels_last ? j : j * g.S);
}
inline int64_t position_step(const Geometry& g) { return g.channels_last ? g.Cg : 1; }

enum class Mode { kNorms, kGrad, kPrune, kNormsBackward };

constexpr int64_t kItemElems = 32 * 1024;             // rows per work item ~ this many elements
constexpr int64_t kBatchBytes = int64_t(1) << 20;  // weights per batch: pass 2 re-reads them from cache

struct Item {
  int64_t tensor;  // index in the batch
  int64_t k0, k1;  // row range
};

// The whole driver for one dtype. `weights` are read; `targets` are the tensors written by
// kGrad (grads, accumulated), kNormsBackward (fresh outputs) and kPrune (the weights themselves).
// For kNormsBackward, out_norms/in_norms are given and (a, b) are in grad_out/grad_in.
template <typename scalar_t>
double run(Mode mode, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& targets,
           const std::vector<Geometry>& geo, double lam_or_threshold,
           std::vector<at::Tensor>& out_norms, std::vector<at::Tensor>& in_norms,
           std::vector<at::Tensor>* keep_out, std::vector<at::Tensor>* keep_in,
           const at::Tensor* grad_out_norms, const at::Tensor* grad_in_norms) {
  using acc = acc_t<scalar_t>;
  const int64_t n = static_cast<int64_t>(weights.size());
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  double penalty = 0.0;

  int64_t first = 0;
  while (first < n) {
    // ---- form a batch of tensors [first, last) -------------------------------------------
    int64_t last = first, bytes = 0;
    while (last < n && (last == first || bytes + weights[last].nbytes() <= kBatchBytes)) {
      bytes += weights[last].nbytes();
      ++last;
    }
    const int64_t nb = last - first;
    std::vector<int64_t> pos_off(nb + 1, 0);  // offsets of each tensor's [groups, Cg*S] block
    std::vector<Item> items;
    std::vector<int64_t> item_elems;
    for (int64_t t = 0; t < nb; ++t) {
      const Geometry& g = geo[first + t];
      pos_off[t + 1] = pos_off[t] + g.groups * g.row_len();
      if (g.numel() == 0) continue;
      const int64_t rows = std::max<int64_t>(1, kItemElems / std::max<int64_t>(1, g.row_len()));
      for (int64_t k0 = 0; k0 < g.K; k0 += rows) {
        const int64_t k1 = std::min(g.K, k0 + rows);
        items.push_back({t, k0, k1});
        item_elems.push_back((k1 - k0) * g.row_len());
      }
    }
    const int64_t npos = pos_off[nb];
    const int64_t nitems = static_cast<int64_t>(items.size());

    // coefficient per row (one vector per tensor, in out_norms' storage after finish) and per
    // position; keep flags per position for pruning.
    std::vector<acc> coef_pos;
    std::vector<uint8_t> keep_pos;
    std::vector<std::vector<acc>> coef_row(nb);

    if (mode != Mode::kNormsBackward) {
      // ---- 1. partial sums --------------------------------------------------------------
      const int64_t nranges = std::max<int64_t>(1, std::min(nthreads, nitems));
      std::vector<int64_t> range_begin(nranges + 1, nitems);
      {  // contiguous ranges of items with about equal element counts
        int64_t total = 0;
        for (int64_t e : item_elems) total += e;
        int64_t acc_elems = 0, r = 1;
        range_begin[0] = 0;
        for (int64_t i = 0; i < nitems && r < nranges; ++i) {
          acc_elems += item_elems[i];
          while (r < nranges && acc_elems * nranges >= total * r) range_begin[r++] = i + 1;
        }
      }
      std::vector<acc> colbuf(static_cast<size_t>(nranges * npos), acc(0));
      at::parallel_for(0, nranges, 1, [&](int64_t rb, int64_t re) {
        std::vector<acc> convert;  // reduced-precision rows are widened once into this
        for (int64_t r = rb; r < re; ++r) {
          acc* col_base = colbuf.data() + r * npos;
          for (int64_t it = range_begin[r]; it < range_begin[r + 1]; ++it) {
            const Item& item = items[it];
            const Geometry& g = geo[first + item.tensor];
            const int64_t L = g.row_len(), rpg = g.rows_per_group();
            const scalar_t* w = weights[first + item.tensor].template const_data_ptr<scalar_t>();
            acc* osq = out_norms[first + item.tensor].template mutable_data_ptr<acc>();
            for (int64_t k = item.k0; k < item.k1; ++k) {
              acc* col = col_base + pos_off[item.tensor] + (k / rpg) * L;
              const scalar_t* row = w + k * L;
              if constexpr (kNeedsConvert<scalar_t>) {
                convert.resize(L);
                for (int64_t p = 0; p < L; ++p) convert[p] = static_cast<acc>(row[p]);
                osq[k] = row_square_accumulate(convert.data(), col, L);
              } else {
                osq[k] = row_square_accumulate(row, col, L);
              }
            }
          }
        }
      });

      // ---- 2. finish ----------------------------------------------------------------------
      if (mode == Mode::kGrad) coef_pos.assign(npos, acc(0));
      if (mode == Mode::kPrune) keep_pos.assign(npos, 1);
      for (int64_t t = 0; t < nb; ++t) {
        const Geometry& g = geo[first + t];
        const int64_t L = g.row_len();
        acc* on = out_norms[first + t].template mutable_data_ptr<acc>();
        acc* in = in_norms[first + t].template mutable_data_ptr<acc>();
        double sum = 0.0;
        for (int64_t k = 0; k < g.K; ++k) {
          on[k] = g.row_len() == 0 ? acc(0) : std::sqrt(on[k]);
          sum += on[k];
        }
        const int64_t step = position_step(g);
        for (int64_t c = 0; c < g.in_channels(); ++c) {
          const int64_t base = pos_off[t] + first_position(g, c);
          acc s = 0;
          for (int64_t r = 0; r < nranges; ++r)
            for (int64_t q = 0; q < g.S; ++q) s += colbuf[r * npos + base + q * step];
          in[c] = std::sqrt(s);
          sum += in[c];
          if (mode == Mode::kGrad) {
            const acc coef = static_cast<acc>(lam_or_threshold) * safe_reciprocal(in[c]);
            for (int64_t q = 0; q < g.S; ++q) coef_pos[base + q * step] = coef;
          } else if (mode == Mode::kPrune) {
            const uint8_t keep = !(in[c] < static_cast<acc>(lam_or_threshold));
            keep_in->at(first + t).template mutable_data_ptr<bool>()[c] = keep;
            for (int64_t q = 0; q < g.S; ++q) keep_pos[base + q * step] = keep;
          }
        }
        penalty += sum;
        if (mode == Mode::kGrad) {
          coef_row[t].resize(g.K);
          for (int64_t k = 0; k < g.K; ++k)
            coef_row[t][k] = static_cast<acc>(lam_or_threshold) * safe_reciprocal(on[k]);
        } else if (mode == Mode::kPrune) {
          bool* ko = keep_out->at(first + t).template mutable_data_ptr<bool>();
          for (int64_t k = 0; k < g.K; ++k) ko[k] = !(on[k] < static_cast<acc>(lam_or_threshold));
        }
      }
    } else {
      // norms backward: a[k] = g_out[k]/out[k], per-position b[c]/in[c]
      coef_pos.assign(npos, acc(0));
      for (int64_t t = 0; t < nb; ++t) {
        const Geometry& g = geo[first + t];
        const acc* on = out_norms[first + t].template const_data_ptr<acc>();
        const acc* in = in_norms[first + t].template const_data_ptr<acc>();
        const acc* go = grad_out_norms->template const_data_ptr<acc>();
        const acc* gi = grad_in_norms->template const_data_ptr<acc>();
        coef_row[t].resize(g.K);
        for (int64_t k = 0; k < g.K; ++k) coef_row[t][k] = go[k] * safe_reciprocal(on[k]);
        const int64_t step = position_step(g);
        for (int64_t c = 0; c < g.in_channels(); ++c) {
          const int64_t base = pos_off[t] + first_position(g, c);
          const acc coef = gi[c] * safe_reciprocal(in[c]);
          for (int64_t q = 0; q < g.S; ++q) coef_pos[base + q * step] = coef;
        }
      }
    }

    // ---- 3. apply -----------------------------------------------------------------------------
    if (mode != Mode::kNorms) {
      at::parallel_for(0, nitems, 1, [&](int64_t ib, int64_t ie) {
        std::vector<acc> wbuf, obuf;
        for (int64_t it = ib; it < ie; ++it) {
          const Item& item = items[it];
          const Geometry& g = geo[first + item.tensor];
          const int64_t L = g.row_len(), rpg = g.rows_per_group();
          const scalar_t* w = weights[first + item.tensor].template const_data_ptr<scalar_t>();
          scalar_t* out = targets[first + item.tensor].template mutable_data_ptr<scalar_t>();
          for (int64_t k = item.k0; k < item.k1; ++k) {
            const int64_t pbase = pos_off[item.tensor] + (k / rpg) * L;
            scalar_t* orow = out + k * L;
            if (mode == Mode::kPrune) {
              const bool keep_row = keep_out->at(first + item.tensor).template const_data_ptr<bool>()[k];
              if (!keep_row) {
                std::fill(orow, orow + L, scalar_t(0));
              } else if constexpr (kNeedsConvert<scalar_t>) {
                row_select_generic(orow, keep_pos.data() + pbase, L);
              } else {
                row_select(orow, keep_pos.data() + pbase, L);
              }
              continue;
            }
            const bool accumulate = mode == Mode::kGrad;
            const acc a = coef_row[item.tensor][k];
            const scalar_t* wrow = w + k * L;
            if constexpr (kNeedsConvert<scalar_t>) {
              wbuf.resize(L);
              obuf.resize(L);
              for (int64_t p = 0; p < L; ++p) wbuf[p] = static_cast<acc>(wrow[p]);
              if (accumulate)
                for (int64_t p = 0; p < L; ++p) obuf[p] = static_cast<acc>(orow[p]);
              row_scale(obuf.data(), wbuf.data(), coef_pos.data() + pbase, a, L, accumulate);
              for (int64_t p = 0; p < L; ++p) orow[p] = static_cast<scalar_t>(obuf[p]);
            } else {
              row_scale(orow, wrow, coef_pos.data() + pbase, a, L, accumulate);
            }
          }
        }
      });
    }
    first = last;
  }
  return penalty;
}

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "group_lasso_cpu", [&] { f(scalar_t(0)); });
}

void check_cpu(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
}

std::vector<at::Tensor> alloc_norms(const std::vector<Geometry>& geo, at::ScalarType wt, bool out) {
  std::vector<at::Tensor> v;
  v.reserve(geo.size());
  for (const auto& g : geo)
    v.push_back(at::empty({out ? g.K : g.in_channels()}, at::TensorOptions().dtype(acc_dtype(wt))));
  return v;
}

// ---- ops ----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> group_lasso_norms_cpu(const at::Tensor& w, int64_t groups) {
  const Geometry g = check_weight(w, groups, "group_lasso_norms", "w");
  check_cpu(w, "group_lasso_norms", "w");
  std::vector<Geometry> geo{g};
  std::vector<at::Tensor> ws{w};
  auto on = alloc_norms(geo, w.scalar_type(), true);
  auto in = alloc_norms(geo, w.scalar_type(), false);
  dispatch_float(w.scalar_type(), [&](auto tag) {
    run<decltype(tag)>(Mode::kNorms, ws, ws, geo, 0.0, on, in, nullptr, nullptr, nullptr, nullptr);
  });
  return {on[0], in[0]};
}

at::Tensor group_lasso_norms_backward_cpu(const at::Tensor& grad_out_norms,
                                          const at::Tensor& grad_in_norms, const at::Tensor& w,
                                          const at::Tensor& out_norms, const at::Tensor& in_norms,
                                          int64_t groups) {
  const char* op = "group_lasso_norms_backward";
  const Geometry g = check_weight(w, groups, op, "w");
  check_cpu(w, op, "w");
  check_norms_backward(grad_out_norms, grad_in_norms, w, out_norms, in_norms, g);
  at::Tensor grad_w = at::empty_like(w);
  std::vector<Geometry> geo{g};
  std::vector<at::Tensor> ws{w}, outs{grad_w}, on{out_norms}, in{in_norms};
  dispatch_float(w.scalar_type(), [&](auto tag) {
    run<decltype(tag)>(Mode::kNormsBackward, ws, outs, geo, 0.0, on, in, nullptr, nullptr,
                       &grad_out_norms, &grad_in_norms);
  });
  return grad_w;
}

at::Tensor group_lasso_grad_cpu(at::TensorList weights, at::TensorList grads, double lam,
                                at::OptionalIntArrayRef groups) {
  const char* op = "group_lasso_grad_";
  TORCH_CHECK(std::isfinite(lam) && lam >= 0, op, ": lam must be finite and >= 0, got ", lam);
  const auto geo = check_lists(weights, &grads, groups, op);
  check_disjoint(grads, op, "grads");
  if (weights.empty()) return at::zeros({}, at::kFloat);
  for (size_t i = 0; i < weights.size(); ++i) check_cpu(weights[i], op, "weights[" + std::to_string(i) + "]");
  const auto wt = weights[0].scalar_type();
  std::vector<at::Tensor> ws(weights.begin(), weights.end()), gs(grads.begin(), grads.end());
  auto on = alloc_norms(geo, wt, true);
  auto in = alloc_norms(geo, wt, false);
  double penalty = 0;
  dispatch_float(wt, [&](auto tag) {
    penalty = run<decltype(tag)>(Mode::kGrad, ws, gs, geo, lam, on, in, nullptr, nullptr, nullptr, nullptr);
  });
  return at::scalar_tensor(penalty * lam, at::TensorOptions().dtype(acc_dtype(wt)));
}

std::tuple<at::Tensor, at::Tensor> group_lasso_prune_cpu(at::TensorList weights, double threshold,
                                                         at::OptionalIntArrayRef groups) {
  const char* op = "group_lasso_prune_";
  TORCH_CHECK(std::isfinite(threshold) && threshold >= 0, op,
              ": threshold must be finite and >= 0, got ", threshold);
  const auto geo = check_lists(weights, nullptr, groups, op);
  check_disjoint(weights, op, "weights");
  int64_t total_out = 0, total_in = 0;
  for (const auto& g : geo) {
    total_out += g.K;
    total_in += g.in_channels();
  }
  auto bool_opts = at::TensorOptions().dtype(at::kBool);
  at::Tensor out_keep = at::empty({total_out}, bool_opts), in_keep = at::empty({total_in}, bool_opts);
  if (weights.empty()) return {out_keep, in_keep};
  for (size_t i = 0; i < weights.size(); ++i) check_cpu(weights[i], op, "weights[" + std::to_string(i) + "]");
  const auto wt = weights[0].scalar_type();
  std::vector<at::Tensor> ws(weights.begin(), weights.end());
  auto on = alloc_norms(geo, wt, true);
  auto in = alloc_norms(geo, wt, false);
  std::vector<at::Tensor> ko, ki;  // per-weight views into the flat masks
  int64_t oo = 0, io = 0;
  for (const auto& g : geo) {
    ko.push_back(out_keep.narrow(0, oo, g.K));
    ki.push_back(in_keep.narrow(0, io, g.in_channels()));
    oo += g.K;
    io += g.in_channels();
  }
  dispatch_float(wt, [&](auto tag) {
    run<decltype(tag)>(Mode::kPrune, ws, ws, geo, threshold, on, in, &ko, &ki, nullptr, nullptr);
  });
  return {out_keep, in_keep};
}

}  // namespace
}  // namespace group_lasso
}  // namespace pyoptim

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  using namespace pyoptim::group_lasso;
  m.impl("group_lasso_norms", &group_lasso_norms_cpu);
  m.impl("group_lasso_norms_backward", &group_lasso_norms_backward_cpu);
  m.impl("group_lasso_grad_", &group_lasso_grad_cpu);
  m.impl("group_lasso_prune_", &group_lasso_prune_cpu);
}
