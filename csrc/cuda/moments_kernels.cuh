// moments_ on CUDA (resflow/moments_math.h, shared with the CPU kernel): mean(x) and mean(x²) over
// every element of x, written to one-element buffers. One block: the threads stride over x and
// reduce their double sums with block_sum, so the sums have a fixed order (deterministic, no
// atomics) and a single launch needs no second pass. Meant for a batch of per-sample values
// (thousands of elements): one block reads them in a few microseconds. Torch-free and emulatable;
// moments_binding.h binds tensors to the launcher.
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"
#include "resflow/moments_math.h"

namespace resflow_cuda::cuda {

constexpr int kMomentsThreads = 256;

template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kMomentsThreads)
    moments_kernel(const scalar_t* __restrict__ x, int64_t n, out_t* __restrict__ mean,
                   out_t* __restrict__ mean_square) {
  double value = 0.0;
  double square = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kMomentsThreads) {
    const scalar_t v = x[i];
    value += static_cast<double>(v);
    square += math::rounded_square(v);
  }
  value = block_sum<double, kMomentsThreads>(value);
  square = block_sum<double, kMomentsThreads>(square);
  if (threadIdx.x == 0) {
    *mean = math::mean_as<scalar_t, out_t>(value, n);
    *mean_square = math::mean_as<scalar_t, out_t>(square, n);
  }
}

// x: n contiguous elements (n may be 0); mean, mean_square: one element each. Device memory.
template <typename scalar_t, typename out_t>
void launch_moments(const scalar_t* x, int64_t n, out_t* mean, out_t* mean_square, cudaStream_t stream) {
  const auto kernel = &moments_kernel<scalar_t, out_t>;
  RESFLOW_LAUNCH(kernel, 1, kMomentsThreads, 0, stream)(x, n, mean, mean_square);
}

}  // namespace resflow_cuda::cuda
