// Power iteration for spectral and induced p->q operator norms (Residual Flows, Chen et al.
// 2019, after the QETLAB induced-matrix-norm method), written with ATen ops in exactly the
// reference's arithmetic (resflows/layers/base/mixed_lipschitz.py and lipschitz.py): the CPU ops
// then reproduce the reference bit for bit, and the CUDA convolution op runs the same loop on the
// device. The single-kernel CUDA version of the dense op is in cuda/power_iteration_kernels.cuh.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/max.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/scatter.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
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

// How the loop learns that it has converged:
//  - HostCheck: read the test every iteration and stop at once (CPU: free; the reference's exact path);
//  - DeviceFlag: keep a device-side "done" flag that freezes u and v once set and counts iterations
//    on the device; the host reads it only every kDeviceCheckInterval iterations (CUDA: no sync per
//    iteration, same result).
enum class ConvergenceCheck { HostCheck, DeviceFlag };
constexpr int64_t kDeviceCheckInterval = 16;

// Returns (u, v, sigma = u^T A v, iterations) with iterations a 0-dim int64 tensor on u's device.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_power_iteration(
    const LinearOperator& op, at::Tensor u, at::Tensor v, const PowerIterationOptions& opt, ConvergenceCheck check) {
  const auto step = [&](const at::Tensor& u0, const at::Tensor& v0) {
    if (opt.u_first) {
      at::Tensor u1 = normalize_u(op.matvec(v0), opt.codomain);
      return std::make_tuple(u1, normalize_v(op.rmatvec(u1), opt.domain));
    }
    at::Tensor v1 = normalize_v(op.rmatvec(u0), opt.domain);
    return std::make_tuple(normalize_u(op.matvec(v1), opt.codomain), v1);
  };
  const auto long_options = u.options().dtype(at::kLong);
  at::Tensor iterations;
  if (check == ConvergenceCheck::HostCheck) {
    int64_t done_iterations = 0;
    for (int64_t it = 0; it < opt.max_iterations; ++it) {
      auto [u1, v1] = step(u, v);
      ++done_iterations;
      const bool converged = opt.tolerance() && step_converged(u1, u, *opt.atol, *opt.rtol).item<bool>() &&
                             step_converged(v1, v, *opt.atol, *opt.rtol).item<bool>();
      u = u1;
      v = v1;
      if (converged) {
        break;
      }
    }
    iterations = at::scalar_tensor(done_iterations, long_options);
  } else {
    at::Tensor done = at::scalar_tensor(false, u.options().dtype(at::kBool));
    iterations = at::scalar_tensor(0, long_options);
    for (int64_t it = 0; it < opt.max_iterations; ++it) {
      auto [u1, v1] = step(u, v);
      iterations = iterations + at::logical_not(done).to(at::kLong);
      if (opt.tolerance()) {
        const at::Tensor converged = at::logical_and(step_converged(u1, u, *opt.atol, *opt.rtol),
                                                     step_converged(v1, v, *opt.atol, *opt.rtol));
        u = at::where(done, u, u1);
        v = at::where(done, v, v1);
        done = at::logical_or(done, converged);
        if ((it + 1) % kDeviceCheckInterval == 0 && done.item<bool>()) {
          break;
        }
      } else {
        u = u1;
        v = v1;
      }
    }
  }
  const at::Tensor sigma = at::dot(u, op.matvec(v));
  return {u, v, sigma, iterations};
}

}  // namespace resflow_cuda
