// Power iteration on one dense matrix in float or double, CPU, one set per CPU capability (see
// cpu_capability.h): vectorized W v and W^T u, the dual maps of resflow/power_iteration_math.h
// and the reference's stopping test, with no allocation and no dispatcher call inside the loop.
#pragma once

#include <cstdint>

#include "../cpu_capability.h"
#include "resflow/power_iteration_math.h"

namespace resflow_cuda::cpu {

template <class T>
struct DensePowerIteration {
  const T* weight;  // m x n, row-major
  int64_t m, n;
  T* u;  // m: start vector in, result out
  T* v;  // n: likewise
  T* workspace;  // max(m, n)
  int64_t max_iterations;
  bool use_tolerance;
  T atol, rtol;
  math::DualMap<T> u_map, v_map;
  bool u_first;
};

#define RESFLOW_POWER_ITERATION_VEC_KERNELS                                                    \
  /* Runs the loop in place on u and v; returns the iterations done and writes sigma. */       \
  template <class T>                                                                           \
  int64_t power_iteration_dense_vec(const DensePowerIteration<T>& args, T* sigma);

RESFLOW_DECLARE_PER_CPU_CAPABILITY(RESFLOW_POWER_ITERATION_VEC_KERNELS)

#undef RESFLOW_POWER_ITERATION_VEC_KERNELS

}  // namespace resflow_cuda::cpu
