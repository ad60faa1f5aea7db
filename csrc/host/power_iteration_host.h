// Host side of the power iteration for spectral and induced p->q operator norms (Residual Flows,
// Chen et al. 2019, after the QETLAB induced-matrix-norm method): the linear operators of a dense
// matrix and of a convolution, the dual maps and the reference's loop, written with ATen ops in
// exactly the reference's arithmetic (resflows/layers/base/mixed_lipschitz.py and lipschitz.py).
// Used by the CPU convolution op and the CUDA bindings; the CPU dense kernel is
// cpu/vec/power_iteration_vec.cpp, the CUDA kernels cuda/power_iteration_kernels.cuh.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/conv_transpose2d.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/flip.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/max.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/scatter.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <functional>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "checks/power_iteration_checks.h"

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

using PowerIterationResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The reference's loop, shared by the CPU and CUDA backends: returns (u, v, sigma = u^T A v,
// iterations), iterations a 0-dim int64 tensor. What differs between backends is `Steps`:
//   const at::Tensor& u(), v()          the current vectors, in the compute dtype
//   void update_u(const at::Tensor& p)  u <- the codomain's dual map of the product p = A v
//   void update_v(const at::Tensor& p)  v <- the domain's dual map of the product p = A^T u
//   bool end_iteration(int64_t count)   after `count` iterations: true to leave the loop (the
//                                       stopping test has passed)
//   at::Tensor iterations()             the iterations run until the stopping test passed
template <class Steps>
PowerIterationResult power_iteration_loop(const LinearOperator& op, Steps& steps, const PowerIterationOptions& opt) {
  at::Tensor last;
  for (int64_t count = 1; count <= opt.max_iterations; ++count) {
    if (opt.u_first) {
      steps.update_u(op.matvec(steps.v()));
      last = op.rmatvec(steps.u());
      steps.update_v(last);
    } else {
      steps.update_v(op.rmatvec(steps.u()));
      last = op.matvec(steps.v());
      steps.update_u(last);
    }
    if (steps.end_iteration(count)) {
      break;
    }
  }
  const at::Tensor sigma = power_iteration_sigma(op, steps.u(), steps.v(), last, opt.u_first);
  return {steps.u(), steps.v(), sigma, steps.iterations()};
}

// The host's steps: the dual maps in ATen ops and the stopping test read after every iteration
// (on a CPU a read costs no pipeline stall).
class HostSteps {
 public:
  HostSteps(at::Tensor u, at::Tensor v, const PowerIterationOptions& opt)
      : u_(std::move(u)), v_(std::move(v)), opt_(opt) {}
  const at::Tensor& u() const { return u_; }
  const at::Tensor& v() const { return v_; }
  void update_u(const at::Tensor& product) {
    old_u_ = u_;
    u_ = normalize_u(product, opt_.codomain);
  }
  void update_v(const at::Tensor& product) {
    old_v_ = v_;
    v_ = normalize_v(product, opt_.domain);
  }
  bool end_iteration(int64_t count) {
    count_ = count;
    return opt_.tolerance() && step_converged(u_, old_u_, *opt_.atol, *opt_.rtol).item<bool>() &&
           step_converged(v_, old_v_, *opt_.atol, *opt_.rtol).item<bool>();
  }
  at::Tensor iterations() const { return at::scalar_tensor(count_, u_.options().dtype(at::kLong)); }

 private:
  at::Tensor u_, v_, old_u_, old_v_;
  const PowerIterationOptions& opt_;
  int64_t count_ = 0;
};

inline PowerIterationResult run_power_iteration(const LinearOperator& op, at::Tensor u, at::Tensor v,
                                                const PowerIterationOptions& opt) {
  HostSteps steps(std::move(u), std::move(v), opt);
  return power_iteration_loop(op, steps, opt);
}

// Runs fn on float32/float64 versions of the tensors (half types compute in float32) and casts u
// and v back to their dtype; sigma stays in the compute dtype.
template <class Fn>
PowerIterationResult power_iteration_in_compute_type(const at::Tensor& weight, const at::Tensor& u,
                                                     const at::Tensor& v, const Fn& fn) {
  const at::ScalarType compute = at::toOpMathType(weight.scalar_type());
  auto [u1, v1, sigma, iterations] = fn(weight.to(compute), u.to(compute), v.to(compute));
  return {u1.to(u.scalar_type()), v1.to(v.scalar_type()), sigma, iterations};
}

// Runs `solve` (one matrix -> (u, v, sigma, iterations)) on every entry and writes the results
// into the given u, v and sigma tensors.
template <class Solve>
void update_in_place(at::TensorList weights, at::TensorList us, at::TensorList vs, at::TensorList sigmas,
                     const Solve& solve) {
  for (size_t i = 0; i < weights.size(); ++i) {
    auto [u, v, sigma, iterations] = solve(weights[i], us[i], vs[i]);
    us[i].copy_(u);
    vs[i].copy_(v);
    sigmas[i].copy_(sigma.reshape(sigmas[i].sizes()));
  }
}

inline LinearOperator dense_operator(const at::Tensor& weight) {
  return {[weight](const at::Tensor& x) { return at::mv(weight, x); },
          [weight](const at::Tensor& y) { return at::mv(weight.t(), y); }};
}

// How conv_operator convolves: x with a kernel (stride, padding, no bias), and y with the
// transposed convolution of the same kernel (no output padding). Backends choose: ATen's by
// default, oneDNN on CPU, cuDNN without TF32 on CUDA.
using Conv2dFn = std::function<at::Tensor(const at::Tensor& x, const at::Tensor& kernel, at::IntArrayRef stride,
                                          at::IntArrayRef padding)>;
struct Convolutions {
  Conv2dFn conv2d;
  Conv2dFn conv_transpose2d;
};

inline Convolutions aten_convolutions() {
  return {[](const at::Tensor& x, const at::Tensor& kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
            return at::conv2d(x, kernel, {}, stride, padding);
          },
          [](const at::Tensor& y, const at::Tensor& kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
            return at::conv_transpose2d(y, kernel, {}, stride, padding);
          }};
}

// A^T of a stride-1 convolution is the convolution with the kernel transposed in its channels and
// flipped in space, padded by k - 1 - p. Where A^T widens the channels (out_channels <
// in_channels) conv_transpose2d is several times slower than that conv2d on CPU (the same
// arithmetic, summed in another order); elsewhere both are as fast and conv_transpose2d saves the
// flip. Other strides use conv_transpose2d.
inline LinearOperator conv_operator(const at::Tensor& weight, const ConvGeometry& g,
                                    const Convolutions& convs = aten_convolutions()) {
  auto matvec = [weight, g, conv = convs.conv2d](const at::Tensor& x) {
    return conv(x.view(g.input_shape), weight, g.stride, g.padding).reshape({-1});
  };
  const int64_t kh = weight.size(2), kw = weight.size(3);
  if (g.stride == std::vector<int64_t>{1, 1} && g.padding[0] < kh && g.padding[1] < kw &&
      weight.size(0) < weight.size(1)) {
    const at::Tensor flipped = weight.transpose(0, 1).flip({2, 3}).contiguous();
    const std::vector<int64_t> padding{kh - 1 - g.padding[0], kw - 1 - g.padding[1]};
    return {matvec, [flipped, g, padding, conv = convs.conv2d](const at::Tensor& y) {
              return conv(y.view(g.output_shape), flipped, {1, 1}, padding).reshape({-1});
            }};
  }
  return {matvec, [weight, g, transpose = convs.conv_transpose2d](const at::Tensor& y) {
            return transpose(y.view(g.output_shape), weight, g.stride, g.padding).reshape({-1});
          }};
}

// `solve(operator, u, v)` on every matrix of a dense batch (or the one matrix), results stacked.
template <class Solve>
PowerIterationResult per_matrix(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                const Solve& solve) {
  if (weight.dim() == 2) {
    return solve(dense_operator(weight), u, v);
  }
  std::vector<at::Tensor> us, vs, sigmas, iterations;
  for (int64_t b = 0; b < weight.size(0); ++b) {
    auto [ub, vb, sb, ib] = solve(dense_operator(weight[b]), u[b], v[b]);
    us.push_back(ub);
    vs.push_back(vb);
    sigmas.push_back(sb);
    iterations.push_back(ib);
  }
  if (us.empty()) {
    const auto opts = u.options();
    return {u.clone(), v.clone(), at::empty({0}, opts), at::empty({0}, opts.dtype(at::kLong))};
  }
  return {at::stack(us), at::stack(vs), at::stack(sigmas), at::stack(iterations)};
}

}  // namespace resflow_cuda
