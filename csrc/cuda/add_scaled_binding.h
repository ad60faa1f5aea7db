// The tensor side of foreach_add_scaled on CUDA: checks and layout (checks/add_scaled_checks.h), the jobs of
// each launch and dtype dispatch, written once for the CUDA backend (add_scaled_cuda.cu) and the emulated
// backend of the tests (see lipswish_binding.h for the Backend interface). Kernel: add_scaled_kernels.cuh.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <vector>

#include "add_scaled_kernels.cuh"
#include "checks/add_scaled_checks.h"

namespace resflow_cuda::cuda {

template <class Backend>
std::vector<at::Tensor> foreach_add_scaled_on(const Backend& backend, at::TensorList a, at::TensorList b,
                                              const at::Tensor& scale) {
  check_add_scaled(a, b, scale);
  const auto guard = backend.guard(scale);
  AddScaledOperands ops = add_scaled_operands(a, b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale.scalar_type(), "foreach_add_scaled_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AddScaledJobs<scalar_t> jobs{};
    int count = 0;
    const auto flush = [&] {
      if (count > 0) {
        launch_add_scaled<scalar_t, acc_t>(jobs, count, scale.const_data_ptr<scalar_t>(), backend.sm_count(scale),
                                           backend.stream());
        backend.check_launch();
        count = 0;
      }
    };
    for (size_t i = 0; i < ops.a.size(); ++i) {
      if (ops.a[i].numel() == 0) {
        continue;
      }
      jobs.job[count++] = {ops.a[i].const_data_ptr<scalar_t>(), ops.b[i].const_data_ptr<scalar_t>(),
                           ops.out[i].mutable_data_ptr<scalar_t>(), ops.a[i].numel()};
      if (count == kAddScaledJobs) {
        flush();
      }
    }
    flush();
  });
  return ops.out;
}

}  // namespace resflow_cuda::cuda
