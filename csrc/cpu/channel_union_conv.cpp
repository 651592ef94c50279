// CPU kernels of the channel-union convolution family (csrc/channel_union_conv.h).
//
// channel_union_conv2d: float32 goes to oneDNN with the tail as post-ops (conv + bias, then
//   "add residual" and ReLU applied by oneDNN on the output tile while it is still in registers:
//   mkldnn::_convolution_pointwise, the kernel torch.compile's CPU backend uses for the same
//   pattern). Other dtypes (float64, float16, bfloat16 — oneDNN's fused path takes float32 only on
//   most CPUs) run the vendor convolution and then one fused pass bias-free add + ReLU in place.
// batch_norm_add_relu / _backward: two passes each over the activation, parallel over
//   (image, channel) planes for NCHW and over fixed row chunks for channels_last. Per-plane /
//   per-chunk partial sums (double, around a per-channel shift so E[x^2] - E[x]^2 does not cancel)
//   are combined in a fixed order: the result does not depend on the thread count.
#include "../channel_union_conv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace pyoptim {
namespace channel_union_conv {
namespace {

constexpr int64_t kRowsPerChunk = 256;  // channels_last: rows of C values per partial-sum chunk

// The activation geometry the kernels walk: NCHW as N*C planes of HW, channels_last as N*HW rows
// of C.
struct Geometry {
  int64_t N, C, HW;
  bool channels_last;
  int64_t M() const { return N * HW; }
};

Geometry geometry(const at::Tensor& x, at::MemoryFormat fmt) {
  return {x.size(0), x.size(1), x.size(2) * x.size(3), fmt == at::MemoryFormat::ChannelsLast};
}

std::vector<double> as_double(const at::Tensor& v) {
  at::Tensor d = v.to(at::kDouble).contiguous().cpu();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

// ---- conv + bias + residual + ReLU ---------------------------------------------------------------

std::optional<c10::OperatorHandle> onednn_conv_pointwise(bool binary) {
  auto handle = c10::Dispatcher::singleton().findSchema(
      {"mkldnn::_convolution_pointwise", binary ? "binary" : ""});
  if (!handle.has_value()) return std::nullopt;
  return handle;
}

template <typename scalar_t>
void add_relu_inplace(at::Tensor& out, const at::Tensor* residual, bool relu) {
  scalar_t* o = out.data_ptr<scalar_t>();
  const scalar_t* r = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t v = static_cast<acc_t>(o[i]);
      if (r) v += static_cast<acc_t>(r[i]);
      if (relu) v = v < acc_t(0) ? acc_t(0) : v;  // NaN stays NaN, as torch.relu
      o[i] = static_cast<scalar_t>(v);
    }
  });
}

at::Tensor channel_union_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& residual,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, bool relu) {
  const auto out_shape = check_conv(x, weight, bias, residual, stride, padding, dilation, groups);
  const auto fmt = activation_format(x);
  const bool has_res = residual.has_value() && residual->defined();
  if (x.numel() == 0 || weight.size(1) == 0) {
    // nothing to convolve: out = act(bias + residual) (or empty)
    at::Tensor out = at::zeros(out_shape, x.options().memory_format(fmt));
    if (bias.has_value() && bias->defined()) out.add_(bias->view({1, -1, 1, 1}));
    if (has_res) out.add_(*residual);
    if (relu) out.clamp_min_(0);
    return out;
  }
  if (x.scalar_type() == at::kFloat && at::hasMKLDNN()) {
    if (auto op = onednn_conv_pointwise(has_res)) {
      const c10::List<std::optional<at::Scalar>> no_scalars;
      const std::optional<c10::string_view> no_algorithm;
      at::Tensor out;
      if (has_res) {
        out = op->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                   at::IntArrayRef, int64_t, c10::string_view,
                                   std::optional<at::Scalar>, std::optional<c10::string_view>,
                                   c10::List<std::optional<at::Scalar>>,
                                   std::optional<c10::string_view>)>()
                  .call(x, residual->contiguous(fmt), weight, bias, padding, stride, dilation,
                        groups, "add", std::nullopt,
                        relu ? std::optional<c10::string_view>("relu") : std::nullopt, no_scalars,
                        no_algorithm);
      } else {
        out = op->typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                   at::IntArrayRef, int64_t, c10::string_view,
                                   c10::List<std::optional<at::Scalar>>,
                                   std::optional<c10::string_view>)>()
                  .call(x, weight, bias, padding, stride, dilation, groups, relu ? "relu" : "none",
                        no_scalars, no_algorithm);
      }
      return out.contiguous(fmt);
    }
  }
  at::Tensor out = at::convolution(x, weight, bias, stride, padding, dilation, /*transposed=*/false,
                                   /*output_padding=*/{0, 0}, groups)
                       .contiguous(fmt);
  if (has_res || relu) {
    at::Tensor res = has_res ? residual->contiguous(fmt) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "channel_union_conv2d",
                                    [&] { add_relu_inplace<scalar_t>(out, has_res ? &res : nullptr, relu); });
  }
  return out;
}

// ---- batch-norm statistics + apply + residual + ReLU ---------------------------------------------

// Per-channel shifted partial sums: part[j * C + c] = (sum (x - shift_c), sum (x - shift_c)^2)
// over the j-th plane (NCHW: image j) or row chunk (channels_last).
template <typename scalar_t>
void partial_moments(const scalar_t* x, const Geometry& g, const std::vector<double>& shift,
                     std::vector<double>& s1, std::vector<double>& s2, int64_t& parts) {
  const int64_t C = g.C;
  if (!g.channels_last) {
    parts = g.N;
    s1.assign(parts * C, 0.0);
    s2.assign(parts * C, 0.0);
    at::parallel_for(0, g.N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {  // plane p = n * C + c
        const int64_t c = p % C;
        const scalar_t* row = x + p * g.HW;
        const double sh = shift[c];
        double a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
        for (int64_t i = 0; i < g.HW; ++i) {
          const double v = static_cast<double>(row[i]) - sh;
          a += v;
          b += v * v;
        }
        s1[p] = a;
        s2[p] = b;
      }
    });
  } else {
    const int64_t rows = g.M();
    parts = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
    s1.assign(parts * C, 0.0);
    s2.assign(parts * C, 0.0);
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        double* a = s1.data() + j * C;
        double* b = s2.data() + j * C;
        const int64_t r1 = std::min(rows, (j + 1) * kRowsPerChunk);
        for (int64_t r = j * kRowsPerChunk; r < r1; ++r) {
          const scalar_t* row = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const double v = static_cast<double>(row[c]) - shift[c];
            a[c] += v;
            b[c] += v * v;
          }
        }
      }
    });
  }
}

// Walks the activation in parallel: NCHW calls plane(c, start, HW) per (image, channel) plane,
// channels_last calls rows(start, count) per chunk of rows of C values. Two callbacks rather
// than one with a per-element channel lookup, so each inner loop vectorises.
template <typename Plane, typename Rows>
void for_each_run(const Geometry& g, const Plane& plane, const Rows& rows) {
  if (!g.channels_last) {
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) plane(p % g.C, p * g.HW, g.HW);
    });
  } else {
    at::parallel_for(0, g.M(), kRowsPerChunk, [&](int64_t begin, int64_t end) {
      rows(begin * g.C, end - begin);
    });
  }
}

template <typename scalar_t>
void bn_forward_kernel(const at::Tensor& x, const at::Tensor* residual, const std::vector<double>& w,
                       const std::vector<double>& b, double eps, bool relu, const Geometry& g,
                       at::Tensor& out, std::vector<double>& mean, std::vector<double>& invstd) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t C = g.C;
  // shift = one sample of each channel (the first): the partial sums stay small for data whose
  // mean is large against its spread
  std::vector<double> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<double>(xp[g.channels_last ? c : c * g.HW]);
  std::vector<double> s1, s2;
  int64_t parts = 0;
  partial_moments(xp, g, shift, s1, s2, parts);
  const double M = static_cast<double>(g.M());
  mean.assign(C, 0.0);
  invstd.assign(C, 0.0);
  std::vector<double> scale(C), offset(C);
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, q = 0;
    for (int64_t j = 0; j < parts; ++j) {
      a += s1[j * C + c];
      q += s2[j * C + c];
    }
    const double dm = a / M;
    const double var = std::max(q / M - dm * dm, 0.0);
    mean[c] = shift[c] + dm;
    invstd[c] = 1.0 / std::sqrt(var + eps);
    scale[c] = w[c] * invstd[c];
    offset[c] = b[c] - mean[c] * scale[c];
  }
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> sc(scale.begin(), scale.end()), of(offset.begin(), offset.end());
  scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
  auto apply = [&](int64_t e, acc_t s, acc_t o) {
    acc_t v = static_cast<acc_t>(xp[e]) * s + o;
    if (rp) v += static_cast<acc_t>(rp[e]);
    if (relu) v = v < acc_t(0) ? acc_t(0) : v;  // NaN stays NaN, as torch.relu
    op[e] = static_cast<scalar_t>(v);
  };
  for_each_run(
      g,
      [&](int64_t c, int64_t start, int64_t n) {
        const acc_t s = sc[c], o = of[c];
#pragma omp simd
        for (int64_t i = start; i < start + n; ++i) apply(i, s, o);
      },
      [&](int64_t start, int64_t nrows) {
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t base = start + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) apply(base + c, sc[c], of[c]);
        }
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_add_relu_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, double eps, bool relu) {
  check_bn_forward(x_in, weight, bias, residual, eps);
  const auto fmt = activation_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const bool has_res = residual.has_value() && residual->defined();
  const at::Tensor res = has_res ? residual->contiguous(fmt) : at::Tensor();
  const Geometry g = geometry(x, fmt);
  at::Tensor out = at::empty_like(x, x.options().memory_format(fmt));
  std::vector<double> mean, invstd;
  const auto w = as_double(weight), b = as_double(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_add_relu", [&] {
    bn_forward_kernel<scalar_t>(x, has_res ? &res : nullptr, w, b, eps, relu, g, out, mean, invstd);
  });
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor mean_t = at::tensor(mean, at::TensorOptions().dtype(at::kDouble)).to(acc);
  at::Tensor invstd_t = at::tensor(invstd, at::TensorOptions().dtype(at::kDouble)).to(acc);
  return {out, mean_t, invstd_t};
}

// Backward, templated on the ReLU and on writing grad_residual so the inner loops carry no
// runtime branch and vectorise. Per-plane sums run in the accumulation type over blocks of
// kSumBlock elements (short enough that float stays exact to ~1e-7) and are added in double.
constexpr int64_t kSumBlock = 512;

template <typename scalar_t, bool RELU, bool GRAD_RES>
void bn_backward_kernel(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x,
                        const std::vector<double>& w, const std::vector<double>& mean,
                        const std::vector<double>& invstd, const Geometry& g, at::Tensor& grad_x,
                        at::Tensor* grad_res, std::vector<double>& sum_g,
                        std::vector<double>& sum_gxhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* op = out.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t C = g.C;
  auto masked = [&](int64_t e) -> acc_t {
    const acc_t gv = static_cast<acc_t>(gp[e]);
    if constexpr (RELU) {
      return static_cast<acc_t>(op[e]) > acc_t(0) ? gv : acc_t(0);
    } else {
      return gv;
    }
  };
  // pass 1: per-plane / per-chunk sums of g and g * (x - mean)
  const int64_t parts = g.channels_last ? (g.M() + kRowsPerChunk - 1) / kRowsPerChunk : g.N;
  std::vector<double> s1(parts * C, 0.0), s2(parts * C, 0.0);
  std::vector<acc_t> mu(C);
  for (int64_t c = 0; c < C; ++c) mu[c] = static_cast<acc_t>(mean[c]);
  if (!g.channels_last) {
    at::parallel_for(0, g.N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t base = p * g.HW;
        const acc_t m = mu[p % C];
        double a = 0, q = 0;
        for (int64_t i0 = 0; i0 < g.HW; i0 += kSumBlock) {
          const int64_t i1 = std::min(g.HW, i0 + kSumBlock);
          acc_t fa = 0, fq = 0;
#pragma omp simd reduction(+ : fa, fq)
          for (int64_t i = i0; i < i1; ++i) {
            const acc_t gv = masked(base + i);
            fa += gv;
            fq += gv * (static_cast<acc_t>(xp[base + i]) - m);
          }
          a += fa;
          q += fq;
        }
        s1[p] = a;
        s2[p] = q;
      }
    });
  } else {
    const int64_t rows = g.M();
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> fa(C), fq(C);
      for (int64_t j = begin; j < end; ++j) {
        std::fill(fa.begin(), fa.end(), acc_t(0));
        std::fill(fq.begin(), fq.end(), acc_t(0));
        const int64_t r1 = std::min(rows, (j + 1) * kRowsPerChunk);
        for (int64_t r = j * kRowsPerChunk; r < r1; ++r) {
          const int64_t base = r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t gv = masked(base + c);
            fa[c] += gv;
            fq[c] += gv * (static_cast<acc_t>(xp[base + c]) - mu[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          s1[j * C + c] = fa[c];
          s2[j * C + c] = fq[c];
        }
      }
    });
  }
  sum_g.assign(C, 0.0);
  sum_gxhat.assign(C, 0.0);
  const double M = static_cast<double>(g.M());
  // grad_x = k1 * g - k2 - k3 * (x - mean) with per-channel k1, k2, k3
  std::vector<acc_t> k1(C), k2(C), k3(C);
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, q = 0;
    for (int64_t j = 0; j < parts; ++j) {
      a += s1[j * C + c];
      q += s2[j * C + c];
    }
    sum_g[c] = a;
    sum_gxhat[c] = q * invstd[c];
    const double s = w[c] * invstd[c];
    k1[c] = static_cast<acc_t>(s);
    k2[c] = static_cast<acc_t>(s * a / M);
    k3[c] = static_cast<acc_t>(s * invstd[c] * invstd[c] * q / M);
  }
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  scalar_t* gr = GRAD_RES ? grad_res->data_ptr<scalar_t>() : nullptr;
  for_each_run(
      g,
      [&](int64_t c, int64_t start, int64_t n) {
        const acc_t a1 = k1[c], a2 = k2[c], a3 = k3[c], m = mu[c];
#pragma omp simd
        for (int64_t e = start; e < start + n; ++e) {
          const acc_t gv = masked(e);
          gx[e] = static_cast<scalar_t>(a1 * gv - a2 - a3 * (static_cast<acc_t>(xp[e]) - m));
          if constexpr (GRAD_RES) gr[e] = static_cast<scalar_t>(gv);
        }
      },
      [&](int64_t start, int64_t nrows) {
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t base = start + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const int64_t e = base + c;
            const acc_t gv = masked(e);
            gx[e] = static_cast<scalar_t>(k1[c] * gv - k2[c] - k3[c] * (static_cast<acc_t>(xp[e]) - mu[c]));
            if constexpr (GRAD_RES) gr[e] = static_cast<scalar_t>(gv);
          }
        }
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_add_relu_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& x_in,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd, bool relu,
    bool residual_grad) {
  check_bn_backward(grad_out_in, out_in, x_in, weight, mean, invstd);
  const auto fmt = activation_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor grad_out = grad_out_in.contiguous(fmt);
  const at::Tensor out = out_in.contiguous(fmt);
  const Geometry g = geometry(x, fmt);
  at::Tensor grad_x = at::empty_like(x, x.options().memory_format(fmt));
  at::Tensor grad_res = residual_grad ? at::empty_like(x, x.options().memory_format(fmt))
                                      : at::empty({0}, x.options());
  std::vector<double> sum_g, sum_gxhat;
  const auto w = as_double(weight), mu = as_double(mean), is = as_double(invstd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_add_relu_backward", [&] {
    at::Tensor* gr = residual_grad ? &grad_res : nullptr;
    if (relu && residual_grad) {
      bn_backward_kernel<scalar_t, true, true>(grad_out, out, x, w, mu, is, g, grad_x, gr, sum_g, sum_gxhat);
    } else if (relu) {
      bn_backward_kernel<scalar_t, true, false>(grad_out, out, x, w, mu, is, g, grad_x, gr, sum_g, sum_gxhat);
    } else if (residual_grad) {
      bn_backward_kernel<scalar_t, false, true>(grad_out, out, x, w, mu, is, g, grad_x, gr, sum_g, sum_gxhat);
    } else {
      bn_backward_kernel<scalar_t, false, false>(grad_out, out, x, w, mu, is, g, grad_x, gr, sum_g, sum_gxhat);
    }
  });
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  return {grad_x, at::tensor(sum_gxhat, opts).to(weight.scalar_type()),
          at::tensor(sum_g, opts).to(weight.scalar_type()), grad_res};
}

}  // namespace
}  // namespace channel_union_conv
}  // namespace pyoptim

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  using namespace pyoptim::channel_union_conv;
  m.impl("channel_union_conv2d", &channel_union_conv2d_cpu);
  m.impl("batch_norm_add_relu", &batch_norm_add_relu_cpu);
  m.impl("batch_norm_add_relu_backward", &batch_norm_add_relu_backward_cpu);
}
