// CPU kernels of the fused dense block (csrc/composite/dense_jacobian_block.cpp): the LipSwish step of a
// forward-mode Jacobian stack and its backward, the per-sample power series from the Jacobians, and the
// Lipschitz weight normalization W / max(1, sigma / coeff) with its backward, for all layers at once.
// Bindings and plain loops over resflow/dense_jacobian_math.h, which the CUDA kernels share.
// Contract: float32 / float64; inputs of any strides (made contiguous); outputs contiguous; sums in
// double where they cross samples (beta's gradient: fixed chunk order, independent of the threads).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "checks/dense_jacobian_checks.h"
#include "parallel_chunks.h"
#include "resflow/dense_jacobian_math.h"
#include "vec/lipswish_vec.h"

namespace resflow_cuda::cpu {
namespace {

template <class scalar_t>
at::Tensor param_filled(const at::Tensor& like, double value) {
  at::Tensor out = at::empty(like.sizes(), like.options());
  *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(value);
  return out;
}

// sum_k a[k] b[k] over n elements in acc_t, as 8 interleaved partial sums added at the end: the loop
// vectorizes, and the order is fixed (independent of the threads and of the vector width).
template <class acc_t, class scalar_t>
acc_t dot_lanes(const scalar_t* a, const scalar_t* b, int64_t n) {
  constexpr int64_t kLanes = 8;
  acc_t part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      part[j] += static_cast<acc_t>(a[k + j]) * static_cast<acc_t>(b[k + j]);
    }
  }
  acc_t total = acc_t(0);
  for (; k < n; ++k) {
    total += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    total += part[j];
  }
  return total;
}

template <class scalar_t>
LipSwishScalars<scalar_t> scalars_of(const at::Tensor& beta) {
  const auto p = math::lipswish_params(*beta.const_data_ptr<scalar_t>());
  return {p.beta, p.dbeta, p.d2beta, scalar_t(0)};
}

// Elements of the primal rows per chunk of a stack kernel: each chunk also covers the same range of every
// tangent block, so the chunk shrinks with the number of blocks (a small batch's stack still spreads over
// the threads), but not below what amortises the scheduling and the chunk's own loop overhead.
int64_t stack_chunk(int64_t blocks) {
  return std::max<int64_t>(4096, kElementwiseChunk / std::max<int64_t>(blocks, 1));
}

// The primal rows through the vectorized LipSwish forward (value and f'), then f' times each tangent row;
// with keep, the first two blocks of a and the second of z also into kept_a and kept_t.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jacobian_lipswish_cpu(const at::Tensor& z_in,
                                                                                 const std::optional<at::Tensor>& bias,
                                                                                 const at::Tensor& beta, int64_t batch,
                                                                                 bool keep) {
  auto o = jacobian_lipswish_operands("resflow_cuda.jacobian_lipswish", z_in, bias, beta, batch, keep);
  const at::Tensor &z = o.z, &b = o.bias;
  at::Tensor &h = o.h, &a = o.a;
  const int64_t width = o.width, blocks = o.blocks;
  const bool with_bias = b.defined();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "jacobian_lipswish_cpu", [&] {
    const auto s = scalars_of<scalar_t>(beta);
    const auto forward = RESFLOW_CPU_PICK(lipswish_forward_vec<scalar_t>);
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* bp = with_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    scalar_t* ap = a.mutable_data_ptr<scalar_t>();
    scalar_t* kap = o.keep ? o.kept_a.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* ktp = o.keep ? o.kept_t.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t n = batch * width;
    std::unique_ptr<scalar_t[]> slope(new scalar_t[static_cast<size_t>(n)]);
    parallel_chunk_sum(n, [&](int64_t begin, int64_t end) {
      if (bp == nullptr) {
        std::copy(zp + begin, zp + end, hp + begin);
      } else {
        // row by row from the chunk's first column: the inner loop vectorizes
        for (int64_t i = begin, j = begin % width; i < end; i += width - j, j = 0) {
          const int64_t len = std::min(width - j, end - i);
          for (int64_t k = 0; k < len; ++k) {
            hp[i + k] = zp[i + k] + bp[j + k];
          }
        }
      }
      forward(hp + begin, ap + begin, slope.get() + begin, end - begin, s);
      for (int64_t block = 1; block < blocks; ++block) {
        const scalar_t* zb = zp + block * n;
        scalar_t* ab = ap + block * n;
        for (int64_t i = begin; i < end; ++i) {
          ab[i] = slope[i] * zb[i];
        }
      }
      if (kap != nullptr) {
        std::copy(ap + begin, ap + end, kap + begin);
        std::copy(ap + n + begin, ap + n + end, kap + n + begin);
        std::copy(zp + n + begin, zp + n + end, ktp + begin);
      }
      return 0.0;
    }, stack_chunk(blocks));
  });
  return {h, a, o.kept_a, o.kept_t};
}

// dh = ga f_x (LipSwish's backward) + sum_k t_k gu_k f_xx, dt_k = gu_k f_x (its double backward with g = t_k,
// gg_x = gu_k), for every tangent block k.
std::tuple<at::Tensor, at::Tensor> jacobian_lipswish_backward_cpu(const at::Tensor& grad_in, const at::Tensor& h_in,
                                                                  const at::Tensor& t_in, const at::Tensor& beta) {
  auto o = jacobian_lipswish_backward_operands("resflow_cuda.jacobian_lipswish_backward", grad_in, h_in, t_in, beta);
  const at::Tensor &grad = o.grad, &h = o.h, &t = o.tangent;
  at::Tensor& out = o.out;
  at::Tensor grad_beta;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "jacobian_lipswish_backward_cpu", [&] {
    const auto s = scalars_of<scalar_t>(beta);
    const auto backward = RESFLOW_CPU_PICK(lipswish_backward_vec<scalar_t>);
    const auto double_backward = RESFLOW_CPU_PICK(lipswish_double_backward_vec<scalar_t>);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const int64_t n = h.numel();
    const int64_t blocks = n == 0 ? 0 : t.numel() / n;
    std::unique_ptr<scalar_t[]> through_slope(new scalar_t[static_cast<size_t>(n)]);
    const double total = parallel_chunk_sum(n, [&](int64_t begin, int64_t end) {
      const int64_t len = end - begin;
      double acc = static_cast<double>(backward(gp + begin, hp + begin, op_ + begin, len, s));
      for (int64_t k = 0; k < blocks; ++k) {
        acc += static_cast<double>(double_backward(tp + k * n + begin, gp + (k + 1) * n + begin, hp + begin,
                                                   op_ + (k + 1) * n + begin, through_slope.get() + begin, len, s));
        for (int64_t i = begin; i < end; ++i) {
          op_[i] += through_slope[i];
        }
      }
      return acc;
    }, stack_chunk(blocks + 1));
    grad_beta = param_filled<scalar_t>(beta, total);
  });
  return {out, grad_beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jacobian_series_cpu(
    const at::Tensor& z_in, const std::optional<at::Tensor>& bias, const at::Tensor& eps_in,
    at::ArrayRef<double> logdet_coeffs, at::ArrayRef<double> neumann_coeffs) {
  auto o = jacobian_series_operands("resflow_cuda.jacobian_series", z_in, bias, eps_in, logdet_coeffs.size(),
                                    neumann_coeffs.size());
  const at::Tensor &z = o.z, &eps = o.eps, &b = o.bias;
  at::Tensor &g = o.g, &logdet = o.logdet, &value = o.value, &w_tilde = o.w_tilde;
  const int64_t batch = o.batch, dim = o.dim;
  const bool neumann = o.neumann, with_bias = b.defined();
  const int64_t terms = static_cast<int64_t>(logdet_coeffs.size());
  AT_DISPATCH_FLOATING_TYPES(eps.scalar_type(), "jacobian_series_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* ep = eps.const_data_ptr<scalar_t>();
    const scalar_t* bp = with_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = g.mutable_data_ptr<scalar_t>();
    acc_t* lp = logdet.mutable_data_ptr<acc_t>();
    acc_t* vp = neumann ? value.mutable_data_ptr<acc_t>() : nullptr;
    scalar_t* wtp = neumann ? w_tilde.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, batch, 16, [&](int64_t first, int64_t last) {
      std::vector<acc_t> w(dim), scratch(dim), wt(dim);
      for (int64_t r = first; r < last; ++r) {
        const math::StackSample<const scalar_t> stack{zp, batch, dim, r};
        const scalar_t* e = ep + r * dim;
        for (int64_t d = 0; d < dim; ++d) {
          gp[r * dim + d] = stack.primal(d) + (bp == nullptr ? scalar_t(0) : bp[d]);
          w[d] = static_cast<acc_t>(e[d]);
          wt[d] = w[d];
        }
        acc_t ld = acc_t(0);
        math::jacobian_series_terms<scalar_t>(dim, stack, e, w.data(), scratch.data(), wt.data(), logdet_coeffs.data(),
                                              neumann ? neumann_coeffs.data() : nullptr, terms, neumann, ld);
        lp[r] = ld;
        if (neumann) {
          // <w~^T J, eps> from the eps tangent, the row the surrogate's gradient seeds.
          acc_t v = acc_t(0);
          for (int64_t d = 0; d < dim; ++d) {
            wtp[r * dim + d] = static_cast<scalar_t>(wt[d]);
            v += static_cast<acc_t>(wtp[r * dim + d]) * static_cast<acc_t>(stack.eps_tangent(d));
          }
          vp[r] = v;
        }
      }
    });
  });
  return {g, logdet, value, w_tilde};
}

// The seed of dense_jacobian_backward for the basic estimator: grad_g on the primal rows, 0 on the eps
// tangent, grad_logdet dL/dJ on the Jacobian's rows.
at::Tensor jacobian_series_backward_cpu(const at::Tensor& z_in, const at::Tensor& eps_in,
                                        at::ArrayRef<double> logdet_coeffs, const at::Tensor& grad_logdet_in,
                                        const at::Tensor& grad_g_in) {
  auto o = jacobian_series_backward_operands("resflow_cuda.jacobian_series_backward", z_in, eps_in, grad_logdet_in,
                                             grad_g_in);
  const int64_t batch = o.batch, dim = o.dim;
  const int64_t terms = static_cast<int64_t>(logdet_coeffs.size());
  AT_DISPATCH_FLOATING_TYPES(o.eps.scalar_type(), "jacobian_series_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = o.z.const_data_ptr<scalar_t>();
    const scalar_t* ep = o.eps.const_data_ptr<scalar_t>();
    const scalar_t* gl = o.grad_logdet.const_data_ptr<scalar_t>();
    const scalar_t* gg = o.grad_g.const_data_ptr<scalar_t>();
    scalar_t* sp = o.seed.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 16, [&](int64_t first, int64_t last) {
      std::vector<acc_t> w(static_cast<size_t>(terms * dim)), b(w.size()), v(static_cast<size_t>(dim));
      for (int64_t r = first; r < last; ++r) {
        math::jacobian_series_seed<scalar_t>(math::StackSample<const scalar_t>{zp, batch, dim, r},
                                             math::StackSample<scalar_t>{sp, batch, dim, r}, ep + r * dim,
                                             gg + r * dim, w.data(), b.data(), v.data(), logdet_coeffs.data(), terms,
                                             static_cast<acc_t>(gl[r]));
      }
    });
  });
  return o.seed;
}

void lipschitz_normalize_cpu(at::TensorList weights, at::TensorList us, at::TensorList vs, at::ArrayRef<double> coeffs,
                             at::TensorList out, const at::Tensor& sigmas, at::TensorList scales) {
  constexpr const char* op = "resflow_cuda.lipschitz_normalize_";
  check_normalize_lists(op, weights, us, vs, coeffs.size());
  check_normalize_outputs(op, weights, out, sigmas, scales);
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor w = weights[i].contiguous();
    const at::Tensor u = us[i].contiguous();
    const at::Tensor v = vs[i].contiguous();
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "lipschitz_normalize_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      const scalar_t* up = u.const_data_ptr<scalar_t>();
      const scalar_t* vp = v.const_data_ptr<scalar_t>();
      const int64_t rows = w.size(0), cols = w.size(1);
      acc_t sigma = acc_t(0);
      for (int64_t r = 0; r < rows; ++r) {
        sigma += static_cast<acc_t>(up[r]) * dot_lanes<acc_t>(wp + r * cols, vp, cols);
      }
      const scalar_t s = static_cast<scalar_t>(sigma);
      const scalar_t factor = math::normalization_factor(s, static_cast<scalar_t>(coeffs[i]));
      scalar_t* np = out[i].mutable_data_ptr<scalar_t>();
      for (int64_t k = 0; k < w.numel(); ++k) {
        np[k] = wp[k] / factor;
      }
      sigmas.mutable_data_ptr<scalar_t>()[i] = s;
      *scales[i].mutable_data_ptr<scalar_t>() = s;
    });
  }
}

std::vector<at::Tensor> lipschitz_normalize_backward_cpu(at::TensorList grads, at::TensorList weights,
                                                         at::TensorList us, at::TensorList vs, const at::Tensor& sigmas,
                                                         at::ArrayRef<double> coeffs,
                                                         const c10::List<bool>& detach_sigma) {
  check_normalize_backward("resflow_cuda.lipschitz_normalize_backward", grads, weights, us, vs, sigmas, coeffs.size(),
                           detach_sigma.size());
  const size_t n = weights.size();
  std::vector<at::Tensor> out(n);
  const at::Tensor sig = sigmas.contiguous();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor g = grads[i].contiguous();
    const at::Tensor w = weights[i].contiguous();
    const at::Tensor u = us[i].contiguous();
    const at::Tensor v = vs[i].contiguous();
    out[i] = at::empty(w.sizes(), w.options());
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "lipschitz_normalize_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      const scalar_t* up = u.const_data_ptr<scalar_t>();
      const scalar_t* vp = v.const_data_ptr<scalar_t>();
      scalar_t* op_ = out[i].mutable_data_ptr<scalar_t>();
      const int64_t rows = w.size(0), cols = w.size(1);
      const scalar_t sigma = sig.const_data_ptr<scalar_t>()[i];
      const scalar_t coeff = static_cast<scalar_t>(coeffs[i]);
      const scalar_t factor = math::normalization_factor(sigma, coeff);
      // dL/dW = G / factor + c u v^T with c = -<G, W> / factor^2 * dfactor/dsigma (0 with detach_sigma).
      const acc_t gw = dot_lanes<acc_t>(gp, wp, w.numel());
      const scalar_t slope = detach_sigma.get(i) ? scalar_t(0) : math::normalization_slope(sigma, coeff);
      const scalar_t c = -static_cast<scalar_t>(gw) / (factor * factor) * slope;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t col = 0; col < cols; ++col) {
          op_[r * cols + col] = gp[r * cols + col] / factor + c * up[r] * vp[col];
        }
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CPU, m) {
  m.impl("jacobian_lipswish", &jacobian_lipswish_cpu);
  m.impl("jacobian_lipswish_backward", &jacobian_lipswish_backward_cpu);
  m.impl("jacobian_series", &jacobian_series_cpu);
  m.impl("jacobian_series_backward", &jacobian_series_backward_cpu);
  m.impl("lipschitz_normalize_", &lipschitz_normalize_cpu);
  m.impl("lipschitz_normalize_backward", &lipschitz_normalize_backward_cpu);
}

}  // namespace resflow_cuda::cpu
