// logdet_series_accumulate_ on the CPU: for every sample b, logdet[b] += logdet_coeff·<w_b, eps_b>
// and neumann += neumann_coeff·w (with scale: w *= scale first, in place), in one pass over w and eps
// (the step of the log-det power series of Residual Flows; resflow/series_math.h, kernels in
// vec/logdet_series_vec.cpp).
// Bindings only: checks and layout (checks/logdet_series_checks.h), dtype dispatch and the parallel
// loop. Each sample is split into fixed chunks of kElementwiseChunk elements; the chunks of all
// samples run in parallel and each sample's chunk sums are added in chunk order in double, so the
// result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "checks/logdet_series_checks.h"
#include "parallel_chunks.h"
#include "vec/logdet_series_vec.h"

namespace resflow_cuda::cpu {
namespace {

void logdet_series_accumulate_cpu(const at::Tensor& w_in, const at::Tensor& eps_in, const at::Tensor& logdet,
                                  const std::optional<at::Tensor>& neumann_in, double logdet_coeff,
                                  double neumann_coeff, const std::optional<at::Tensor>& scale_in) {
  check_logdet_series(w_in, eps_in, logdet, neumann_in, scale_in);
  TORCH_CHECK(w_in.device().is_cpu(), kSeriesOp, ": expected CPU tensors, but got w on ", w_in.device());
  const SeriesOperands ops = series_operands(w_in, eps_in, neumann_in, scale_in);
  if (ops.rows == 0 || ops.cols == 0) {
    return;
  }
  const int64_t chunks_per_row = (ops.cols + kElementwiseChunk - 1) / kElementwiseChunk;
  std::vector<double> partial(ops.rows * chunks_per_row);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.w.scalar_type(), "logdet_series_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto kernel = RESFLOW_CPU_PICK(logdet_series_vec<scalar_t>);
    scalar_t* w = ops.w.mutable_data_ptr<scalar_t>();  // written only when scaled (the schema marks it mutable)
    const scalar_t* eps = ops.eps.const_data_ptr<scalar_t>();
    const scalar_t* scale = ops.scale.defined() ? ops.scale.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* neumann = ops.neumann.defined() ? ops.neumann.mutable_data_ptr<scalar_t>() : nullptr;
    const auto coeff = static_cast<acc_t>(neumann_coeff);
    at::parallel_for(0, ops.rows * chunks_per_row, 1, [&](int64_t first, int64_t last) {
      for (int64_t u = first; u < last; ++u) {
        const int64_t begin = (u / chunks_per_row) * ops.cols + (u % chunks_per_row) * kElementwiseChunk;
        const int64_t len = std::min(kElementwiseChunk, ops.cols - (u % chunks_per_row) * kElementwiseChunk);
        partial[u] = static_cast<double>(
            kernel(w + begin, eps + begin, scale == nullptr ? nullptr : scale + begin,
                   neumann == nullptr ? nullptr : neumann + begin, len, coeff));
      }
    });
  });
  AT_DISPATCH_FLOATING_TYPES(logdet.scalar_type(), "logdet_series_cpu_sum", [&] {
    scalar_t* out = logdet.mutable_data_ptr<scalar_t>();
    const int64_t stride = logdet.stride(0);
    for (int64_t r = 0; r < ops.rows; ++r) {
      double sum = 0.0;
      for (int64_t c = 0; c < chunks_per_row; ++c) {
        sum += partial[r * chunks_per_row + c];
      }
      out[r * stride] += static_cast<scalar_t>(logdet_coeff * sum);
    }
  });
  finish_series(ops, w_in, neumann_in);
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CPU, m) {
  m.impl("logdet_series_accumulate_", &logdet_series_accumulate_cpu);
}

}  // namespace resflow_cuda::cpu
