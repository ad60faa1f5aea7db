// The tensor side of moments_ on CUDA: checks (checks/moments_checks.h), layout and dtype dispatch,
// written once for the CUDA backend (moments_cuda.cu) and the emulated backend of the tests (see
// lipswish_binding.h for the Backend interface). Kernel: moments_kernels.cuh.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "checks/moments_checks.h"
#include "moments_kernels.cuh"

namespace resflow_cuda::cuda {

template <class Backend>
void moments_on(const Backend& backend, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& mean_square) {
  check_moments(x_in, mean, mean_square);
  const auto guard = backend.guard(x_in);
  const at::Tensor x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moments_cuda", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mean.scalar_type(), "moments_cuda_out", [&] {
      launch_moments<x_t, scalar_t>(x.const_data_ptr<x_t>(), x.numel(), mean.mutable_data_ptr<scalar_t>(),
                                    mean_square.mutable_data_ptr<scalar_t>(), backend.stream());
      backend.check_launch();
    });
  });
}

}  // namespace resflow_cuda::cuda
