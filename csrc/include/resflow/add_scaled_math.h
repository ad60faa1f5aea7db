// One element of foreach_add_scaled, shared by the CPU and CUDA kernels: a + b·s, the sum of a
// backward-in-forward block's two shares of a parameter's gradient (g's, and the log-det's scaled by
// the upstream gradient), in the compute type; the caller rounds the result to the dtype. Torch-free.
#pragma once

#include "macros.h"

namespace resflow_cuda::math {

template <class T>
RESFLOW_HOST_DEVICE_INLINE T add_scaled(const T& a, const T& b, const T& s) {
  return a + b * s;
}

}  // namespace resflow_cuda::math
