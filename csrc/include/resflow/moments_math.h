// The batch moments of a block's log-det estimate (the reference's training statistics), shared by
// the CPU and CUDA kernels: each element contributes x and x², the square rounded to x's dtype as
// the reference's `value ** 2` is; the sums are taken in double by the callers, and each mean is
// rounded to x's dtype (torch.mean's result dtype) before the caller stores it in its buffer.
// Torch-free.
#pragma once

#include <cstdint>

#include "macros.h"

namespace resflow_cuda::math {

// x², rounded to x's type (for the half types the product is formed in float and rounded once).
template <class T>
RESFLOW_HOST_DEVICE_INLINE double rounded_square(const T& x) {
  return static_cast<double>(static_cast<T>(x * x));
}

// sum / n in x's type T, then in the buffer's type Out; n = 0 gives NaN, as torch.mean of nothing.
template <class T, class Out>
RESFLOW_HOST_DEVICE_INLINE Out mean_as(double sum, int64_t n) {
  const T mean = static_cast<T>(sum / static_cast<double>(n));
  return static_cast<Out>(mean);
}

}  // namespace resflow_cuda::math
