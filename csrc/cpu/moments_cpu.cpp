// moments_ on the CPU: mean[0] = mean(x) and mean_square[0] = mean(x²) over every element of x
// (resflow/moments_math.h), in one pass: parallel_chunk_sum's fixed chunks, each chunk's two sums in
// double, added in chunk order, so the result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks/moments_checks.h"
#include "parallel_chunks.h"
#include "resflow/moments_math.h"

namespace resflow_cuda::cpu {
namespace {

struct Sums {
  double value = 0.0;
  double square = 0.0;

  Sums& operator+=(const Sums& other) {
    value += other.value;
    square += other.square;
    return *this;
  }
};

void moments_cpu(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& mean_square) {
  check_moments(x_in, mean, mean_square);
  TORCH_CHECK(x_in.device().is_cpu(), kMomentsOp, ": expected CPU tensors, but got x on ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moments_cpu", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    const Sums total = parallel_chunk_sum<Sums>(n, [&](int64_t begin, int64_t end) {
      Sums s;
      for (int64_t i = begin; i < end; ++i) {
        s.value += static_cast<double>(data[i]);
        s.square += math::rounded_square(data[i]);
      }
      return s;
    });
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mean.scalar_type(), "moments_cpu_out", [&] {
      *mean.mutable_data_ptr<scalar_t>() = math::mean_as<x_t, scalar_t>(total.value, n);
      *mean_square.mutable_data_ptr<scalar_t>() = math::mean_as<x_t, scalar_t>(total.square, n);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CPU, m) {
  m.impl("moments_", &moments_cpu);
}

}  // namespace resflow_cuda::cpu
