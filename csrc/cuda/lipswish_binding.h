// The tensor side of the LipSwish CUDA ops: argument checks, layout, outputs, workspace, launch
// plan and dtype dispatch. Written once for two backends that differ only in `Backend`:
// CudaBackend in lipswish_cuda.cu (device guard, current stream, the device's SM count, launch
// check) and the emulated backend of the test extension (tests/emulated), which runs the same
// launchers on CPU memory under the CUDA emulator. Kernels: lipswish_kernels.cuh.
//
// Backend provides: guard(const Tensor&) -> RAII object; stream() -> cudaStream_t;
// sm_count(const Tensor&) -> int; check_launch().
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <initializer_list>
#include <tuple>

#include "checks/lipswish_checks.h"
#include "lipswish_kernels.cuh"

namespace resflow_cuda::cuda {

template <typename scalar_t, class Backend>
ElementwisePlan plan_for(const Backend& backend, const at::Tensor& x, std::initializer_list<const at::Tensor*> operands) {
  bool aligned = true;
  for (const at::Tensor* t : operands) {
    aligned = aligned && (t == nullptr || aligned_for_vectors(t->const_data_ptr()));
  }
  return plan_elementwise<scalar_t>(x.numel(), backend.sm_count(x), aligned);
}

inline at::Tensor block_sums_for(const ElementwisePlan& plan, const at::Tensor& x) {
  return at::empty({plan.blocks}, x.options().dtype(at::kDouble));
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> lipswish_forward_on(const Backend& backend, const char* op, const at::Tensor& x_in,
                                                       const at::Tensor& beta, bool with_derivative) {
  check_lipswish_forward(op, x_in, beta);
  const auto guard = backend.guard(x_in);
  const ElementwiseOperands operands = elementwise_operands({x_in});
  const at::Tensor& x = operands.tensors[0];
  at::Tensor y = operands.new_output();
  at::Tensor dydx = with_derivative ? operands.new_output() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lipswish_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto plan = plan_for<scalar_t>(backend, x, {&x, &y, with_derivative ? &dydx : nullptr});
    launch_lipswish_forward<scalar_t, acc_t>(plan, x.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
                                             y.mutable_data_ptr<scalar_t>(),
                                             with_derivative ? dydx.mutable_data_ptr<scalar_t>() : nullptr, x.numel(),
                                             backend.stream());
    backend.check_launch();
  });
  return {y, dydx};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> lipswish_backward_on(const Backend& backend, const at::Tensor& grad_in,
                                                        const at::Tensor& x_in, const at::Tensor& beta) {
  check_lipswish_backward("resflow_cuda.lipswish_backward", grad_in, x_in, beta);
  const auto guard = backend.guard(x_in);
  const ElementwiseOperands operands = elementwise_operands({grad_in, x_in});
  const at::Tensor& grad = operands.tensors[0];
  const at::Tensor& x = operands.tensors[1];
  at::Tensor grad_x = operands.new_output();
  at::Tensor grad_beta = at::empty(beta.sizes(), beta.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lipswish_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto plan = plan_for<scalar_t>(backend, x, {&grad, &x, &grad_x});
    at::Tensor block_sums = block_sums_for(plan, x);
    launch_lipswish_backward<scalar_t, acc_t>(
        plan, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
        grad_x.mutable_data_ptr<scalar_t>(), block_sums.mutable_data_ptr<double>(),
        grad_beta.mutable_data_ptr<scalar_t>(), x.numel(), backend.stream());
    backend.check_launch();
  });
  return {grad_x, grad_beta};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lipswish_double_backward_on(const Backend& backend,
                                                                           const at::Tensor& grad_in,
                                                                           const at::Tensor& gg_x_in,
                                                                           const at::Tensor& gg_beta,
                                                                           const at::Tensor& x_in,
                                                                           const at::Tensor& beta) {
  check_lipswish_double_backward("resflow_cuda.lipswish_double_backward", grad_in, gg_x_in, gg_beta, x_in, beta);
  const auto guard = backend.guard(x_in);
  const ElementwiseOperands operands = elementwise_operands({grad_in, gg_x_in, x_in});
  const at::Tensor& grad = operands.tensors[0];
  const at::Tensor& gg_x = operands.tensors[1];
  const at::Tensor& x = operands.tensors[2];
  at::Tensor grad_grad = operands.new_output();
  at::Tensor grad_x = operands.new_output();
  at::Tensor grad_beta = at::empty(beta.sizes(), beta.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lipswish_double_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto plan = plan_for<scalar_t>(backend, x, {&grad, &gg_x, &x, &grad_grad, &grad_x});
    at::Tensor block_sums = block_sums_for(plan, x);
    launch_lipswish_double_backward<scalar_t, acc_t>(
        plan, grad.const_data_ptr<scalar_t>(), gg_x.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        beta.const_data_ptr<scalar_t>(), gg_beta.const_data_ptr<scalar_t>(), grad_grad.mutable_data_ptr<scalar_t>(),
        grad_x.mutable_data_ptr<scalar_t>(), block_sums.mutable_data_ptr<double>(),
        grad_beta.mutable_data_ptr<scalar_t>(), x.numel(), backend.stream());
    backend.check_launch();
  });
  return {grad_grad, grad_x, grad_beta};
}

}  // namespace resflow_cuda::cuda
