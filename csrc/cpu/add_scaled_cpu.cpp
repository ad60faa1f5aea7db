// foreach_add_scaled on the CPU: out[i] = a[i] + b[i]·scale for every pair (resflow/add_scaled_math.h),
// a multiply and an add in the compute type (float for the half types), rounded to the pair's dtype; one
// call for all pairs (every pair shares scale's dtype).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "checks/add_scaled_checks.h"
#include "parallel_chunks.h"
#include "resflow/add_scaled_math.h"

namespace resflow_cuda::cpu {
namespace {

std::vector<at::Tensor> foreach_add_scaled_cpu(at::TensorList a, at::TensorList b, const at::Tensor& scale) {
  check_add_scaled(a, b, scale);
  TORCH_CHECK(scale.device().is_cpu(), kAddScaledOp, ": expected CPU tensors, but got scale on ", scale.device());
  AddScaledOperands ops = add_scaled_operands(a, b);
  for (size_t i = 0; i < ops.a.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.a[i].scalar_type(), "foreach_add_scaled_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto s = static_cast<acc_t>(*scale.const_data_ptr<scalar_t>());  // read in place: item() would be a dispatched read
      const scalar_t* pa = ops.a[i].const_data_ptr<scalar_t>();
      const scalar_t* pb = ops.b[i].const_data_ptr<scalar_t>();
      scalar_t* po = ops.out[i].mutable_data_ptr<scalar_t>();
      at::parallel_for(0, ops.a[i].numel(), kElementwiseChunk, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          po[k] = static_cast<scalar_t>(
              math::add_scaled(static_cast<acc_t>(pa[k]), static_cast<acc_t>(pb[k]), s));
        }
      });
    });
  }
  return ops.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CPU, m) {
  m.impl("foreach_add_scaled", &foreach_add_scaled_cpu);
}

}  // namespace resflow_cuda::cpu
