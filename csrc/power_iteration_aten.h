// Power iteration for spectral and induced p->q operator norms (Residual Flows, Chen et al.
// 2019, after the QETLAB induced-matrix-norm method), written with ATen ops in exactly the
// reference's arithmetic (resflows/layers/base/mixed_lipschitz.py and lipschitz.py): the CPU
// convolution op and the reference twin of the dense op; the CPU dense kernel is
// cpu/vec/power_iteration_vec.cpp, the CUDA kernels cuda/power_iteration_kernels.cuh.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/max.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/scatter.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <functional>
#include <limits>
#include <tuple>

namespace resflow_cuda {

constexpr double kNormalizeEps = 1e-12;  // F.normalize's default

// A linear operator A on flattened vectors: matvec(v) = A v, rmatvec(u) = A^T u.
struct LinearOperator {
  std::function<at::Tensor(const at::Tensor&)> matvec;
  std::function<at::Tensor(const at::Tensor&)> rmatvec;
};

// One-hot at the first index of max |x| (the reference's projmax_).
inline at::Tensor projmax(const at::Tensor& x) {
  return at::zeros_like(x).scatter_(0, at::argmax(at::abs(x)).reshape({1}), 1);
}

inline at::Tensor l2_normalize(const at::Tensor& x) {
  return x / at::linalg_vector_norm(x, 2, {0}, /*keepdim=*/true).clamp_min(kNormalizeEps);
}

// sign(x) with 0 (and NaN) mapped to 1, then the Hoelder dual map (|x|/max|x|)^e / norm.
inline at::Tensor hoelder_dual(const at::Tensor& x, double exponent, double dual_p) {
  at::Tensor sign = x / at::abs(x);
  sign.masked_fill_(at::isnan(sign), 1);
  at::Tensor mag = at::abs(x);
  mag = at::pow(mag / at::max(mag), exponent);
  // The reference's vector_norm: (sum m^p)^(1/p), also for p = inf.
  const at::Tensor norm = at::pow(at::sum(at::pow(mag, dual_p)), 1.0 / dual_p);
  return sign * mag / norm;
}

// Dual map of the domain norm p for v.
inline at::Tensor normalize_v(const at::Tensor& v, double p) {
  if (p == 2) {
    return l2_normalize(v);
  }
  if (p == 1) {
    return projmax(v);
  }
  return hoelder_dual(v, 1.0 / (p - 1), p);
}

// Dual map of the codomain norm q for u.
inline at::Tensor normalize_u(const at::Tensor& u, double q) {
  if (q == 2) {
    return l2_normalize(u);
  }
  if (std::isinf(q)) {
    return projmax(u);
  }
  return hoelder_dual(u, q - 1, q == 1 ? std::numeric_limits<double>::infinity() : q / (q - 1));
}

// The reference's stopping test: ||x - x_old|| / sqrt(len) < atol + rtol * max(x), as a 0-dim bool.
inline at::Tensor step_converged(const at::Tensor& x, const at::Tensor& x_old, double atol, double rtol) {
  const at::Tensor err = at::linalg_vector_norm(x - x_old, 2) / std::sqrt(static_cast<double>(x.numel()));
  return err < at::max(x) * rtol + atol;
}

struct PowerIterationOptions {
  int64_t max_iterations;
  c10::optional<double> atol;
  c10::optional<double> rtol;
  double domain;    // p, the norm on the input (v) side
  double codomain;  // q, the norm on the output (u) side
  bool u_first;     // InducedNorm* order (u then v); SpectralNorm* updates v first
  bool tolerance() const { return atol.has_value() && rtol.has_value(); }
};

// sigma = u^T A v. `last` is the loop's final product, A^T u (u first) or A v (v first) of the
// final u and v, when there was one: then sigma = <A^T u, v> or <u, A v> saves the operator
// application the reference spends on it (the same number up to float rounding).
inline at::Tensor power_iteration_sigma(const LinearOperator& op, const at::Tensor& u, const at::Tensor& v,
                                        const at::Tensor& last, bool u_first) {
  if (!last.defined()) {
    return at::dot(u, op.matvec(v));
  }
  return u_first ? at::dot(last, v) : at::dot(u, last);
}

// The reference's loop: returns (u, v, sigma = u^T A v, iterations), iterations a 0-dim int64
// tensor. The stopping test is read on the host after every step (CPU; on CUDA see
// cuda/power_iteration_binding.h).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_power_iteration(const LinearOperator& op,
                                                                                      at::Tensor u, at::Tensor v,
                                                                                      const PowerIterationOptions& opt) {
  int64_t iterations = 0;
  at::Tensor last;
  for (int64_t it = 0; it < opt.max_iterations; ++it) {
    at::Tensor u1, v1;
    if (opt.u_first) {
      u1 = normalize_u(op.matvec(v), opt.codomain);
      last = op.rmatvec(u1);
      v1 = normalize_v(last, opt.domain);
    } else {
      v1 = normalize_v(op.rmatvec(u), opt.domain);
      last = op.matvec(v1);
      u1 = normalize_u(last, opt.codomain);
    }
    ++iterations;
    const bool converged = opt.tolerance() && step_converged(u1, u, *opt.atol, *opt.rtol).item<bool>() &&
                           step_converged(v1, v, *opt.atol, *opt.rtol).item<bool>();
    u = u1;
    v = v1;
    if (converged) {
      break;
    }
  }
  const at::Tensor sigma = power_iteration_sigma(op, u, v, last, opt.u_first);
  return {u, v, sigma, at::scalar_tensor(iterations, u.options().dtype(at::kLong))};
}

}  // namespace resflow_cuda
