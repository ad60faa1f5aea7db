// LipSwish CPU ops (Residual Flows, Chen et al. 2019): f(x) = x·σ(βx)/1.1, β = softplus(b).
// Bindings only: argument checks, layout, dtype dispatch and the parallel chunk loop. The
// arithmetic is in vec/lipswish_vec.cpp (one build per CPU capability) over
// resflow/lipswish_math.h, which the CUDA kernels share.
// Contract: x (any shape and strides; float32/64, float16, bfloat16) and beta (shape [1] or 0-dim,
// same dtype and device). Outputs keep x's strides when x is dense, else are contiguous
// (elementwise_operands). Half/BFloat16 compute in float; grad_beta is summed in float/double
// per chunk and in double across chunks.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "parallel_chunks.h"
#include "checks/lipswish_checks.h"
#include "checks/tensor_checks.h"
#include "resflow/lipswish_math.h"
#include "vec/lipswish_vec.h"

namespace resflow_cuda::cpu {
namespace {

template <class scalar_t>
LipSwishScalars<at::opmath_type<scalar_t>> lipswish_scalars(const at::Tensor& beta, const at::Tensor* gg_beta) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto p = math::lipswish_params(static_cast<acc_t>(*beta.const_data_ptr<scalar_t>()));
  const acc_t k = gg_beta == nullptr ? acc_t(0) : static_cast<acc_t>(*gg_beta->const_data_ptr<scalar_t>());
  return {p.beta, p.dbeta, p.d2beta, k};
}

// A tensor shaped like the parameter beta holding one value.
template <class scalar_t>
at::Tensor param_filled(const at::Tensor& beta, double value) {
  at::Tensor out = at::empty(beta.sizes(), beta.options());
  *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(value);
  return out;
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const char* op, const at::Tensor& x_in, const at::Tensor& beta,
                                                bool with_derivative) {
  check_lipswish_forward(op, x_in, beta);
  const ElementwiseOperands operands = elementwise_operands({x_in});
  const at::Tensor& x = operands.tensors[0];
  at::Tensor y = operands.new_output();
  at::Tensor dydx = with_derivative ? operands.new_output() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lipswish_cpu", [&] {
    const auto s = lipswish_scalars<scalar_t>(beta, nullptr);
    const auto kernel = RESFLOW_CPU_PICK(lipswish_forward_vec<scalar_t>);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* dp = with_derivative ? dydx.mutable_data_ptr<scalar_t>() : nullptr;
    parallel_chunk_sum(x.numel(), [&](int64_t begin, int64_t end) {
      kernel(xp + begin, yp + begin, dp == nullptr ? nullptr : dp + begin, end - begin, s);
      return 0.0;
    });
  });
  return {y, dydx};
}

at::Tensor lipswish_cpu(const at::Tensor& x, const at::Tensor& beta) {
  return std::get<0>(forward_impl("resflow_cuda.lipswish", x, beta, false));
}

std::tuple<at::Tensor, at::Tensor> lipswish_with_derivative_cpu(const at::Tensor& x, const at::Tensor& beta) {
  return forward_impl("resflow_cuda.lipswish_with_derivative", x, beta, true);
}

std::tuple<at::Tensor, at::Tensor> lipswish_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                         const at::Tensor& beta) {
  constexpr const char* op = "resflow_cuda.lipswish_backward";
  check_lipswish_backward(op, grad_in, x_in, beta);
  const ElementwiseOperands operands = elementwise_operands({grad_in, x_in});
  const at::Tensor& grad = operands.tensors[0];
  const at::Tensor& x = operands.tensors[1];
  at::Tensor grad_x = operands.new_output();
  at::Tensor grad_beta;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lipswish_cpu", [&] {
    const auto s = lipswish_scalars<scalar_t>(beta, nullptr);
    const auto kernel = RESFLOW_CPU_PICK(lipswish_backward_vec<scalar_t>);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    const double total = parallel_chunk_sum(x.numel(), [&](int64_t begin, int64_t end) {
      return static_cast<double>(kernel(gp + begin, xp + begin, gxp + begin, end - begin, s));
    });
    grad_beta = param_filled<scalar_t>(beta, total);
  });
  return {grad_x, grad_beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lipswish_double_backward_cpu(const at::Tensor& grad_in,
                                                                            const at::Tensor& gg_x_in,
                                                                            const at::Tensor& gg_beta,
                                                                            const at::Tensor& x_in,
                                                                            const at::Tensor& beta) {
  constexpr const char* op = "resflow_cuda.lipswish_double_backward";
  check_lipswish_double_backward(op, grad_in, gg_x_in, gg_beta, x_in, beta);
  const ElementwiseOperands operands = elementwise_operands({grad_in, gg_x_in, x_in});
  const at::Tensor& grad = operands.tensors[0];
  const at::Tensor& gg_x = operands.tensors[1];
  const at::Tensor& x = operands.tensors[2];
  at::Tensor grad_grad = operands.new_output();
  at::Tensor grad_x = operands.new_output();
  at::Tensor grad_beta;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lipswish_cpu", [&] {
    const auto s = lipswish_scalars<scalar_t>(beta, &gg_beta);
    const auto kernel = RESFLOW_CPU_PICK(lipswish_double_backward_vec<scalar_t>);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* hp = gg_x.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* ggp = grad_grad.mutable_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    const double total = parallel_chunk_sum(x.numel(), [&](int64_t begin, int64_t end) {
      return static_cast<double>(
          kernel(gp + begin, hp + begin, xp + begin, ggp + begin, gxp + begin, end - begin, s));
    });
    grad_beta = param_filled<scalar_t>(beta, total);
  });
  return {grad_grad, grad_x, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CPU, m) {
  m.impl("lipswish", &lipswish_cpu);
  m.impl("lipswish_with_derivative", &lipswish_with_derivative_cpu);
  m.impl("lipswish_backward", &lipswish_backward_cpu);
  m.impl("lipswish_double_backward", &lipswish_double_backward_cpu);
}

}  // namespace resflow_cuda::cpu
