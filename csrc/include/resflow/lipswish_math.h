// LipSwish, the activation of Residual Flows (Chen et al., NeurIPS 2019, §4):
//   f(x) = x · σ(βx) / 1.1,   β = softplus(b),   b the learnable parameter.
// Its first and second derivatives in x and b live here once, for every backend: the CPU
// vector kernels (T = at::vec::Vectorized<float|double>, with their own Ops), the CUDA kernels
// and the CUDA emulator (T = float|double, ScalarOps). Torch-free.
#pragma once

#include <math.h>

#include "resflow/macros.h"

namespace resflow_cuda::math {

// The maximum slope of x·σ(βx) is ≈ 1.0998 for every β > 0, so dividing by 1.1 makes Lip(f) ≤ 1.
// The kernels multiply by the rounded reciprocal (a division costs ~5× a multiply on every
// backend); results differ from the reference's division by at most one rounding.
constexpr double kLipSwishScale = 1.0 / 1.1;

// Softplus above this argument returns its input, as torch.nn.functional.softplus does by
// default; keeping the same rule makes β and its gradient agree with the PyTorch reference.
constexpr double kSoftplusThreshold = 20.0;

// The two primitives the formulas need, for plain float/double. The CPU vector kernels pass
// an Ops type with the same members for at::vec::Vectorized.
struct ScalarOps {
  static RESFLOW_HOST_DEVICE_INLINE float exp(float v) { return expf(v); }
  static RESFLOW_HOST_DEVICE_INLINE double exp(double v) { return ::exp(v); }
  // a where z >= 0, else b (NaN z takes b; every formula below propagates the NaN anyway).
  template <class T>
  static RESFLOW_HOST_DEVICE_INLINE T select_nonneg(T z, T a, T b) {
    return z >= T(0) ? a : b;
  }
};

RESFLOW_HOST_DEVICE_INLINE float log1p_(float v) { return log1pf(v); }
RESFLOW_HOST_DEVICE_INLINE double log1p_(double v) { return ::log1p(v); }

// σ(z), 1 − σ(z) and σ(z)(1 − σ(z)) without overflow or cancellation. With e = exp(−z):
// σ = 1/(1 + e) is exact at both ends (e overflowing to inf for very negative z gives σ = 0).
// 1 − σ is formed as 1 − σ where σ ≤ 1/2 (z ≤ 0, no cancellation) and as e·σ where z > 0, because
// there 1 − σ would cancel (it rounds to 0 for z > 17 in float) and lose every term in t.
template <class T>
struct SigmoidParts {
  T s;   // σ(z)
  T sc;  // 1 − σ(z)
  T t;   // σ(z)(1 − σ(z)) = σ'(z)
};

template <class Ops, class T>
RESFLOW_HOST_DEVICE_INLINE SigmoidParts<T> sigmoid_parts(T z) {
  const T e = Ops::exp(T(0) - z);
  SigmoidParts<T> p;
  p.s = T(1) / (T(1) + e);
  p.sc = Ops::select_nonneg(z, e * p.s, T(1) - p.s);
  p.t = p.s * p.sc;
  return p;
}

// β = softplus(b) and its first two derivatives in b, computed once per kernel launch.
template <class T>
struct LipSwishParams {
  T beta;    // softplus(b)
  T dbeta;   // dβ/db = σ(b)
  T d2beta;  // d²β/db² = σ(b)(1 − σ(b))
};

// Above the threshold softplus is the identity, so its derivatives are 1 and 0 there, as in
// torch's softplus backward; gradients then match the reference exactly.
template <class T>
RESFLOW_HOST_DEVICE_INLINE LipSwishParams<T> lipswish_params(T b) {
  const SigmoidParts<T> sb = sigmoid_parts<ScalarOps>(b);
  const bool linear = b > T(kSoftplusThreshold);
  LipSwishParams<T> p;
  p.beta = linear ? b : log1p_(ScalarOps::exp(b));
  p.dbeta = linear ? T(1) : sb.s;
  p.d2beta = linear ? T(0) : sb.t;
  return p;
}

// f alone: x σ(βx) / 1.1 = x / (1 + exp(−βx)) / 1.1, which needs none of the care the
// derivatives need (inf·0 only for x = −inf, where the reference gives NaN as well).
template <class Ops, class T>
RESFLOW_HOST_DEVICE_INLINE T lipswish_value(T x, T beta) {
  return x / (T(1) + Ops::exp(T(0) - beta * x)) * T(kLipSwishScale);
}

// Everything about f at one x for a fixed β. With s = σ(βx), t = s(1 − s), z = βx:
//   f      = x s / 1.1
//   f_x    = (s + z t) / 1.1
//   f_β    = x² t / 1.1
//   f_xx   = β q,  f_xβ = x q,  where q = t (2 + z (1 − 2s)) / 1.1
//   f_ββ   = x³ t (1 − 2s) / 1.1
// Products are ordered t-first (x·t before ·x): t decays like exp(−|z|), so x·t stays finite for
// every finite x, whereas x² alone overflows float for |x| > 1.8e19.
template <class Ops, class T>
struct LipSwishPoint {
  T x, z;
  SigmoidParts<T> sp;

  RESFLOW_HOST_DEVICE_INLINE LipSwishPoint(T x_, T beta) : x(x_), z(beta * x_) {
    sp = sigmoid_parts<Ops>(z);
  }
  RESFLOW_HOST_DEVICE_INLINE T value() const { return x * sp.s * T(kLipSwishScale); }
  RESFLOW_HOST_DEVICE_INLINE T d_x() const { return (sp.s + z * sp.t) * T(kLipSwishScale); }
  RESFLOW_HOST_DEVICE_INLINE T d_beta() const { return x * (x * sp.t) * T(kLipSwishScale); }
  // q of the comment above; f_xx = β q and f_xβ = x q.
  RESFLOW_HOST_DEVICE_INLINE T q() const {
    return sp.t * (T(2) + z * (sp.sc - sp.s)) * T(kLipSwishScale);
  }
  RESFLOW_HOST_DEVICE_INLINE T d_beta_beta() const {
    return x * (x * ((x * sp.t) * (sp.sc - sp.s))) * T(kLipSwishScale);
  }
};

// The per-element work of the four ops. Gradients with respect to b are accumulated as sums of
// per-element terms; the kernels reduce them and apply no further factor.

// Backward: returns ∂L/∂x = g f_x; the element's share of ∂L/∂b is g f_β dβ/db.
template <class Ops, class T>
RESFLOW_HOST_DEVICE_INLINE T lipswish_backward_element(T g, T x, T beta, T dbeta, T& grad_b) {
  const LipSwishPoint<Ops, T> pt(x, beta);
  grad_b = g * pt.d_beta() * dbeta;
  return g * pt.d_x();
}

// Double backward. The backward op maps (g, x, b) to (gx = g f_x, gb = Σ g f_b); given the
// upstream gradients h of gx (elementwise) and k of gb (a scalar), this returns
//   ∂/∂g = h f_x + k f_b,   ∂/∂x = g (h f_xx + k f_xb),   and the element's share of
//   ∂/∂b = g (h f_xb + k f_bb),
// with f_b = f_β β',  f_xb = f_xβ β',  f_bb = f_ββ β'² + f_β β''  (β' = dβ/db, β'' = d²β/db²).
template <class Ops, class T>
RESFLOW_HOST_DEVICE_INLINE void lipswish_double_backward_element(
    T g, T h, T x, T k, T beta, T dbeta, T d2beta, T& grad_grad, T& grad_x, T& grad_b) {
  const LipSwishPoint<Ops, T> pt(x, beta);
  const T q = pt.q();
  const T f_beta = pt.d_beta();
  const T kd = k * dbeta;
  grad_grad = h * pt.d_x() + kd * f_beta;
  grad_x = g * q * (h * beta + kd * x);
  grad_b = g * (h * x * q * dbeta + k * (pt.d_beta_beta() * dbeta * dbeta + f_beta * d2beta));
}

}  // namespace resflow_cuda::math
