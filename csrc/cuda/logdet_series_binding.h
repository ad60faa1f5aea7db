// The tensor side of logdet_series_accumulate_ on CUDA: checks and layout
// (checks/logdet_series_checks.h), launch plan and dtype dispatch, written once for the CUDA backend
// (logdet_series_cuda.cu) and the emulated backend of the tests (see lipswish_binding.h for the
// Backend interface). Kernel: logdet_series_kernels.cuh.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <optional>

#include "checks/logdet_series_checks.h"
#include "logdet_series_kernels.cuh"

namespace resflow_cuda::cuda {

template <class Backend>
void logdet_series_accumulate_on(const Backend& backend, const at::Tensor& w_in, const at::Tensor& eps_in,
                                 const at::Tensor& logdet, const std::optional<at::Tensor>& neumann_in,
                                 double logdet_coeff, double neumann_coeff, const std::optional<at::Tensor>& scale_in) {
  check_logdet_series(w_in, eps_in, logdet, neumann_in, scale_in);
  const auto guard = backend.guard(w_in);
  const SeriesOperands ops = series_operands(w_in, eps_in, neumann_in, scale_in);
  if (ops.rows == 0 || ops.cols == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.w.scalar_type(), "logdet_series_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool aligned = aligned_for_vectors(ops.w.const_data_ptr()) && aligned_for_vectors(ops.eps.const_data_ptr()) &&
                         (!ops.neumann.defined() || aligned_for_vectors(ops.neumann.const_data_ptr())) &&
                         (!ops.scale.defined() || aligned_for_vectors(ops.scale.const_data_ptr()));
    const SeriesPlan plan = plan_series<scalar_t>(ops.rows, ops.cols, backend.sm_count(ops.w), aligned);
    launch_logdet_series<scalar_t, acc_t>(
        plan, ops.w.mutable_data_ptr<scalar_t>(), ops.eps.const_data_ptr<scalar_t>(),
        ops.scale.defined() ? ops.scale.const_data_ptr<scalar_t>() : nullptr,
        ops.neumann.defined() ? ops.neumann.mutable_data_ptr<scalar_t>() : nullptr, logdet.mutable_data_ptr<acc_t>(),
        logdet.stride(0), ops.rows, ops.cols, static_cast<acc_t>(logdet_coeff), static_cast<acc_t>(neumann_coeff),
        backend.stream());
    backend.check_launch();
  });
  finish_series(ops, w_in, neumann_in);
}

}  // namespace resflow_cuda::cuda
