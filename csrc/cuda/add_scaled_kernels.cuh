// foreach_add_scaled on CUDA (resflow/add_scaled_math.h, shared with the CPU kernel): out = a + b·scale
// for up to kAddScaledJobs pairs of contiguous tensors per launch, passed by value; blockIdx.y picks the
// pair and the blocks along x stride over its elements. scale is read from device memory (no host read).
// Torch-free and emulatable; add_scaled_binding.h binds tensors to the launcher.
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"
#include "resflow/add_scaled_math.h"

namespace resflow_cuda::cuda {

constexpr int kAddScaledJobs = 24;
template <typename scalar_t>
struct AddScaledJob {
  const scalar_t* a;
  const scalar_t* b;
  scalar_t* out;
  int64_t n;
};
template <typename scalar_t>
struct AddScaledJobs {
  AddScaledJob<scalar_t> job[kAddScaledJobs];
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    add_scaled_kernel(AddScaledJobs<scalar_t> jobs, const scalar_t* __restrict__ scale) {
  const AddScaledJob<scalar_t>& job = jobs.job[blockIdx.y];
  const acc_t s = static_cast<acc_t>(*scale);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < job.n; i += stride) {
    job.out[i] = static_cast<scalar_t>(
        math::add_scaled(static_cast<acc_t>(job.a[i]), static_cast<acc_t>(job.b[i]), s));
  }
}

// count <= kAddScaledJobs jobs with n >= 1 each; blocks along x enough for the longest pair once, at most
// elementwise_min_blocks per SM (grid-stride beyond). Every pointer is device memory.
template <typename scalar_t, typename acc_t>
void launch_add_scaled(const AddScaledJobs<scalar_t>& jobs, int count, const scalar_t* scale, int sm_count,
                       cudaStream_t stream) {
  int64_t longest = 1;
  for (int j = 0; j < count; ++j) {
    longest = jobs.job[j].n > longest ? jobs.job[j].n : longest;
  }
  const int64_t needed = (longest + kElementwiseThreads - 1) / kElementwiseThreads;
  const int64_t cap = static_cast<int64_t>(sm_count) * elementwise_min_blocks<scalar_t>();
  const dim3 grid(static_cast<unsigned>(needed < cap ? needed : cap), static_cast<unsigned>(count));
  const auto kernel = &add_scaled_kernel<scalar_t, acc_t>;
  RESFLOW_LAUNCH(kernel, grid, kElementwiseThreads, 0, stream)(jobs, scale);
}

}  // namespace resflow_cuda::cuda
