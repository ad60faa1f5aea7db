// LipSwish CPU kernels over raw arrays, one set per CPU capability (see cpu_capability.h).
// Each function handles n consecutive elements; the caller splits the tensor into chunks and
// runs them in parallel. Half and BFloat16 are computed in float, everything else in its own type.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../cpu_capability.h"

namespace resflow_cuda::cpu {

// The scalars a LipSwish kernel needs, in the compute type: β = softplus(b) and its derivatives
// (resflow/lipswish_math.h) and, for the double backward, the upstream gradient of grad_b.
template <class acc_t>
struct LipSwishScalars {
  acc_t beta;
  acc_t dbeta;
  acc_t d2beta;
  acc_t gg_beta;
};

#define RESFLOW_LIPSWISH_VEC_KERNELS                                                               \
  /* y = f(x); dydx = f'(x) when dydx is not null. */                                             \
  template <class scalar_t>                                                                        \
  void lipswish_forward_vec(const scalar_t* x, scalar_t* y, scalar_t* dydx, int64_t n,           \
                            const LipSwishScalars<at::opmath_type<scalar_t>>& s);                  \
  /* grad_x = g f'(x); returns Σ g ∂f/∂b over the n elements. */                                  \
  template <class scalar_t>                                                                        \
  at::opmath_type<scalar_t> lipswish_backward_vec(const scalar_t* grad, const scalar_t* x,         \
                                                  scalar_t* grad_x, int64_t n,                     \
                                                  const LipSwishScalars<at::opmath_type<scalar_t>>& s); \
  /* See lipswish_double_backward_element; returns the n elements' share of ∂/∂b. */              \
  template <class scalar_t>                                                                        \
  at::opmath_type<scalar_t> lipswish_double_backward_vec(                                          \
      const scalar_t* grad, const scalar_t* gg_x, const scalar_t* x, scalar_t* grad_grad,          \
      scalar_t* grad_x, int64_t n, const LipSwishScalars<at::opmath_type<scalar_t>>& s);

RESFLOW_DECLARE_PER_CPU_CAPABILITY(RESFLOW_LIPSWISH_VEC_KERNELS)

#undef RESFLOW_LIPSWISH_VEC_KERNELS

}  // namespace resflow_cuda::cpu
