// The tensor side of actnorm and actnorm_backward on CUDA: checks, layout and outputs (checks/actnorm_checks.h)
// and dtype dispatch, written once for the CUDA backend (actnorm_cuda.cu) and the emulated backend of the tests
// (see lipswish_binding.h for the Backend interface). Kernels: actnorm_kernels.cuh.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "actnorm_kernels.cuh"
#include "checks/actnorm_checks.h"

namespace resflow_cuda::cuda {

template <class Backend>
std::tuple<at::Tensor, at::Tensor> actnorm_on(const Backend& backend, const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& bias, const std::optional<at::Tensor>& logp,
                                              int64_t sign) {
  const ActNormOperands ops = actnorm_operands(x, weight, bias, logp, sign);
  const auto guard = backend.guard(x);
  const ActNormShape& s = ops.shape;
  const bool with_logp = ops.logp.defined();
  if (ops.x.numel() == 0 && !(with_logp && s.batch > 0)) {
    return {ops.y, ops.logp_out};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "actnorm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_actnorm<scalar_t, acc_t>(ops.x.const_data_ptr<scalar_t>(), ops.weight.const_data_ptr<scalar_t>(),
                                    ops.bias.const_data_ptr<scalar_t>(),
                                    with_logp ? ops.logp.const_data_ptr<scalar_t>() : nullptr,
                                    ops.y.mutable_data_ptr<scalar_t>(),
                                    with_logp ? ops.logp_out.mutable_data_ptr<scalar_t>() : nullptr, s.batch,
                                    s.channels, s.positions, static_cast<acc_t>(sign * s.positions),
                                    backend.sm_count(x), backend.stream());
    backend.check_launch();
  });
  return {ops.y, ops.logp_out};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_backward_on(const Backend& backend, const at::Tensor& grad_y,
                                                                   const std::optional<at::Tensor>& grad_logp,
                                                                   const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, int64_t sign) {
  const ActNormBackwardOperands ops = actnorm_backward_operands(grad_y, grad_logp, x, weight, bias, sign);
  const auto guard = backend.guard(x);
  const ActNormShape& s = ops.shape;
  if (s.channels == 0) {
    return {ops.grad_x, ops.grad_weight, ops.grad_bias};
  }
  const bool with_logp = ops.grad_logp.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "actnorm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_actnorm_backward<scalar_t, acc_t>(
        ops.grad_y.const_data_ptr<scalar_t>(), with_logp ? ops.grad_logp.const_data_ptr<scalar_t>() : nullptr,
        ops.x.const_data_ptr<scalar_t>(), ops.weight.const_data_ptr<scalar_t>(), ops.bias.const_data_ptr<scalar_t>(),
        ops.grad_x.mutable_data_ptr<scalar_t>(), ops.grad_weight.mutable_data_ptr<scalar_t>(),
        ops.grad_bias.mutable_data_ptr<scalar_t>(), s.batch, s.channels, s.positions,
        static_cast<double>(sign * s.positions), backend.stream());
    backend.check_launch();
  });
  return {ops.grad_x, ops.grad_weight, ops.grad_bias};
}

}  // namespace resflow_cuda::cuda
