// The fused log-det series step over raw arrays, one set per CPU capability (see
// cpu_capability.h): n consecutive elements of one sample. Half and BFloat16 compute in float.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../cpu_capability.h"

namespace resflow_cuda::cpu {

#define RESFLOW_LOGDET_SERIES_VEC_KERNELS                                                              \
  /* Returns sum w·eps over the n elements; neumann += neumann_coeff·w when neumann is not null. With */ \
  /* scale (not null) w *= scale first, written back; w is only read otherwise. */                       \
  template <class scalar_t>                                                                              \
  at::opmath_type<scalar_t> logdet_series_vec(scalar_t* w, const scalar_t* eps, const scalar_t* scale,   \
                                              scalar_t* neumann, int64_t n,                              \
                                              at::opmath_type<scalar_t> neumann_coeff);

RESFLOW_DECLARE_PER_CPU_CAPABILITY(RESFLOW_LOGDET_SERIES_VEC_KERNELS)

#undef RESFLOW_LOGDET_SERIES_VEC_KERNELS

}  // namespace resflow_cuda::cpu
