// LipSwish CUDA ops (Residual Flows, Chen et al. 2019): tensor binding and launch only; the
// kernels are in lipswish_kernels.cuh over resflow/lipswish_math.h.
// Contract as the CPU ops (csrc/cpu/lipswish_cpu.cpp): x any shape and strides (float32/64,
// float16, bfloat16; half types compute in float), beta shape [1] or 0-dim on the same device.
// Launches on the current stream of x's device; never synchronises with the host.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../lipswish_common.h"
#include "cuda_utils.h"
#include "lipswish_kernels.cuh"

namespace resflow_cuda::cuda {
namespace {

template <typename scalar_t>
ElementwisePlan plan_for(const at::Tensor& x, std::initializer_list<const at::Tensor*> operands) {
  bool aligned = true;
  for (const at::Tensor* t : operands) {
    aligned = aligned && (t == nullptr || aligned_for_vectors(t->const_data_ptr()));
  }
  return plan_elementwise<scalar_t>(x.numel(), sm_count(x.get_device()), aligned);
}

at::Tensor block_sums_for(const ElementwisePlan& plan, const at::Tensor& x) {
  return at::empty({plan.blocks}, x.options().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const char* op, const at::Tensor& x_in, const at::Tensor& beta,
                                                bool with_derivative) {
  check_lipswish_forward(op, x_in, beta);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const ElementwiseOperands operands = elementwise_operands({x_in});
  const at::Tensor& x = operands.tensors[0];
  at::Tensor y = operands.new_output();
  at::Tensor dydx = with_derivative ? operands.new_output() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lipswish_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto plan = plan_for<scalar_t>(x, {&x, &y, with_derivative ? &dydx : nullptr});
    launch_lipswish_forward<scalar_t, acc_t>(plan, x.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
                                             y.mutable_data_ptr<scalar_t>(),
                                             with_derivative ? dydx.mutable_data_ptr<scalar_t>() : nullptr, x.numel(),
                                             c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, dydx};
}

at::Tensor lipswish_cuda(const at::Tensor& x, const at::Tensor& beta) {
  return std::get<0>(forward_impl("resflow_cuda.lipswish", x, beta, false));
}

std::tuple<at::Tensor, at::Tensor> lipswish_with_derivative_cuda(const at::Tensor& x, const at::Tensor& beta) {
  return forward_impl("resflow_cuda.lipswish_with_derivative", x, beta, true);
}

std::tuple<at::Tensor, at::Tensor> lipswish_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                          const at::Tensor& beta) {
  check_lipswish_backward("resflow_cuda.lipswish_backward", grad_in, x_in, beta);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const ElementwiseOperands operands = elementwise_operands({grad_in, x_in});
  const at::Tensor& grad = operands.tensors[0];
  const at::Tensor& x = operands.tensors[1];
  at::Tensor grad_x = operands.new_output();
  at::Tensor grad_beta = at::empty(beta.sizes(), beta.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lipswish_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto plan = plan_for<scalar_t>(x, {&grad, &x, &grad_x});
    at::Tensor block_sums = block_sums_for(plan, x);
    launch_lipswish_backward<scalar_t, acc_t>(
        plan, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
        grad_x.mutable_data_ptr<scalar_t>(), block_sums.mutable_data_ptr<double>(),
        grad_beta.mutable_data_ptr<scalar_t>(), x.numel(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lipswish_double_backward_cuda(const at::Tensor& grad_in,
                                                                             const at::Tensor& gg_x_in,
                                                                             const at::Tensor& gg_beta,
                                                                             const at::Tensor& x_in,
                                                                             const at::Tensor& beta) {
  check_lipswish_double_backward("resflow_cuda.lipswish_double_backward", grad_in, gg_x_in, gg_beta, x_in, beta);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const ElementwiseOperands operands = elementwise_operands({grad_in, gg_x_in, x_in});
  const at::Tensor& grad = operands.tensors[0];
  const at::Tensor& gg_x = operands.tensors[1];
  const at::Tensor& x = operands.tensors[2];
  at::Tensor grad_grad = operands.new_output();
  at::Tensor grad_x = operands.new_output();
  at::Tensor grad_beta = at::empty(beta.sizes(), beta.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lipswish_double_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto plan = plan_for<scalar_t>(x, {&grad, &gg_x, &x, &grad_grad, &grad_x});
    at::Tensor block_sums = block_sums_for(plan, x);
    launch_lipswish_double_backward<scalar_t, acc_t>(
        plan, grad.const_data_ptr<scalar_t>(), gg_x.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        beta.const_data_ptr<scalar_t>(), gg_beta.const_data_ptr<scalar_t>(), grad_grad.mutable_data_ptr<scalar_t>(),
        grad_x.mutable_data_ptr<scalar_t>(), block_sums.mutable_data_ptr<double>(),
        grad_beta.mutable_data_ptr<scalar_t>(), x.numel(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_grad, grad_x, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CUDA, m) {
  m.impl("lipswish", &lipswish_cuda);
  m.impl("lipswish_with_derivative", &lipswish_with_derivative_cuda);
  m.impl("lipswish_backward", &lipswish_backward_cuda);
  m.impl("lipswish_double_backward", &lipswish_double_backward_cuda);
}

}  // namespace resflow_cuda::cuda
