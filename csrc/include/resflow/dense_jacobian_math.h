// The forward-mode Jacobian of a dense residual branch and the Lipschitz weight normalization, as the
// fused dense-block ops compute them (csrc/composite/dense_jacobian_block.cpp), once for every backend:
// the CPU kernels, the CUDA kernels and the CUDA emulator. Torch-free.
//
// A stack holds S = 2 + D blocks of B rows: the primal rows (the branch's activations), the tangent
// rows along the probe eps, and one block of tangent rows per input direction e_d. An activation step
// maps a pre-activation stack z to
//   a = f(h) on the primal rows (h = z + bias),   a = f'(h) z on every tangent row,
// the same h (the sample's primal row) for all S - 1 tangents of a sample.
#pragma once

#include <stdint.h>

#include "resflow/lipswish_math.h"
#include "resflow/macros.h"

namespace resflow_cuda::math {

// The backward of one LipSwish step of the stack, restricted to the primal row and the eps tangent
// (the rows the Neumann surrogate and g depend on). Given the gradients ga of a = f(h) and gu of
// u = f'(h) t (t: the eps tangent's pre-activation), returns those of h and t, and the element's share
// of the gradient of the raw beta b:
//   dh = ga f_x + gu t f_xx,   dt = gu f_x,   db = (ga f_beta + gu t f_xbeta) dbeta/db.
template <class T>
RESFLOW_HOST_DEVICE_INLINE void jacobian_lipswish_backward_element(T ga, T gu, T h, T t, T beta, T dbeta, T& dh,
                                                                   T& dt, T& db) {
  const LipSwishPoint<ScalarOps, T> pt(h, beta);
  const T q = pt.q();  // f_xx = beta q, f_xbeta = h q
  const T slope = pt.d_x();
  const T gut = gu * t;
  dh = ga * slope + gut * (beta * q);
  dt = gu * slope;
  db = (ga * pt.d_beta() + gut * (h * q)) * dbeta;
}

// One sample's view of a stack of 2 + dim blocks of `batch` rows of `dim` values: the primal row (block 0),
// the eps tangent (block 1) and J(i, d), entry i of the tangent along e_d (block 2 + d).
template <class T>
struct StackSample {
  T* z;
  int64_t batch, dim, row;
  RESFLOW_HOST_DEVICE_INLINE T& primal(int64_t i) const { return z[row * dim + i]; }
  RESFLOW_HOST_DEVICE_INLINE T& eps_tangent(int64_t i) const { return z[(batch + row) * dim + i]; }
  RESFLOW_HOST_DEVICE_INLINE T& at(int64_t i, int64_t d) const { return z[((2 + d) * batch + row) * dim + i]; }
  RESFLOW_HOST_DEVICE_INLINE T operator()(int64_t i, int64_t d) const { return at(i, d); }
  template <class V>
  RESFLOW_HOST_DEVICE_INLINE void add(int64_t i, int64_t d, V value) const {
    at(i, d) += static_cast<T>(value);
  }
};

// One sample's power series from its Jacobian J (D x D, J(e, d) = dg_e / dx_d), `count` more terms: each
// w <- J^T w (w holds the last term's vector on entry and exit, eps for the first; scratch is D more
// values), logdet += logdet_coeffs[k] <w, eps> and, with neumann, w_tilde += neumann_coeffs[k] w.
template <class T, class Acc, class Jac>
RESFLOW_HOST_DEVICE_INLINE void jacobian_series_terms(int64_t dim, const Jac& jac, const T* eps, Acc* w, Acc* scratch,
                                                      Acc* w_tilde, const double* logdet_coeffs,
                                                      const double* neumann_coeffs, int64_t count, bool neumann,
                                                      Acc& logdet) {
  for (int64_t k = 0; k < count; ++k) {
    Acc dot = Acc(0);
    for (int64_t d = 0; d < dim; ++d) {
      Acc s = Acc(0);
      for (int64_t e = 0; e < dim; ++e) {
        s += w[e] * static_cast<Acc>(jac(e, d));
      }
      scratch[d] = s;
      dot += s * static_cast<Acc>(eps[d]);
    }
    logdet += static_cast<Acc>(logdet_coeffs[k]) * dot;
    for (int64_t d = 0; d < dim; ++d) {
      w[d] = scratch[d];
      if (neumann) {
        w_tilde[d] += static_cast<Acc>(neumann_coeffs[k]) * scratch[d];
      }
    }
  }
}

// The gradient of grad_logdet sum_k c_k e^T J^k e (k = 1..count, c_k = logdet_coeffs[k - 1]) with respect to
// one sample's Jacobian: dL/dJ = grad_logdet sum_k c_k sum_{j + m = k - 1} ((J^T)^j e) (J^m e)^T, written as
// adding into out.add(i, d, value) (the seed of J(i, d), zero on entry). w and b hold count * dim values
// each (the powers), v dim more.
template <class T, class Acc, class Jac, class Out>
RESFLOW_HOST_DEVICE_INLINE void jacobian_series_backward_terms(int64_t dim, const Jac& jac, const T* eps, Acc* w,
                                                               Acc* b, Acc* v, const double* logdet_coeffs,
                                                               int64_t count, Acc grad_logdet, Out out) {
  for (int64_t d = 0; d < dim; ++d) {
    w[d] = static_cast<Acc>(eps[d]);
    b[d] = w[d];
  }
  for (int64_t k = 1; k < count; ++k) {  // w_k = J^T w_{k-1}, b_k = J b_{k-1}
    for (int64_t d = 0; d < dim; ++d) {
      Acc sw = Acc(0), sb = Acc(0);
      for (int64_t e = 0; e < dim; ++e) {
        sw += w[(k - 1) * dim + e] * static_cast<Acc>(jac(e, d));
        sb += static_cast<Acc>(jac(d, e)) * b[(k - 1) * dim + e];
      }
      w[k * dim + d] = sw;
      b[k * dim + d] = sb;
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    // v = sum_m c_{j+m+1} b_m, the partner of w_j
    for (int64_t d = 0; d < dim; ++d) {
      Acc s = Acc(0);
      for (int64_t m = 0; j + m < count; ++m) {
        s += static_cast<Acc>(logdet_coeffs[j + m]) * b[m * dim + d];
      }
      v[d] = s * grad_logdet;
    }
    for (int64_t i = 0; i < dim; ++i) {
      for (int64_t d = 0; d < dim; ++d) {
        out.add(i, d, w[j * dim + i] * v[d]);
      }
    }
  }
}

// One sample's seed of the basic estimator's backward, written into its rows of `seed` (a stack like the
// last one): grad_g on the primal row, 0 on the eps tangent, d(grad_logdet estimate)/dJ on the Jacobian's
// rows (jacobian_series_backward_terms, with its scratch w, b and v).
template <class T, class Acc>
RESFLOW_HOST_DEVICE_INLINE void jacobian_series_seed(const StackSample<const T>& jac, const StackSample<T>& seed,
                                                     const T* eps, const T* grad_g, Acc* w, Acc* b, Acc* v,
                                                     const double* logdet_coeffs, int64_t count, Acc grad_logdet) {
  for (int64_t i = 0; i < jac.dim; ++i) {
    seed.primal(i) = grad_g[i];
    seed.eps_tangent(i) = T(0);
    for (int64_t d = 0; d < jac.dim; ++d) {
      seed.at(i, d) = T(0);
    }
  }
  jacobian_series_backward_terms<T>(jac.dim, jac, eps, w, b, v, logdet_coeffs, count, grad_logdet, seed);
}

// W / max(1, sigma / coeff) (torch.max: NaN propagates): the factor W is divided by.
template <class T>
RESFLOW_HOST_DEVICE_INLINE T normalization_factor(T sigma, T coeff) {
  const T r = sigma / coeff;
  return r > T(1) || r != r ? r : T(1);
}

// d factor / d sigma as autograd takes it through torch.max: 1/coeff where sigma / coeff > 1, half of it
// at a tie (torch.max splits the gradient of equal inputs), 0 below.
template <class T>
RESFLOW_HOST_DEVICE_INLINE T normalization_slope(T sigma, T coeff) {
  const T r = sigma / coeff;
  const T share = r > T(1) || r != r ? T(1) : (r == T(1) ? T(0.5) : T(0));
  return share / coeff;
}

}  // namespace resflow_cuda::math
