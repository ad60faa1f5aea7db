// Argument checks of the LipSwish ops, shared by the CPU and CUDA bindings so that both refuse
// the same inputs with the same messages.
#pragma once

#include "checks/tensor_checks.h"

namespace resflow_cuda {

inline void check_lipswish_forward(const char* op, const at::Tensor& x, const at::Tensor& beta) {
  check_tensor_and_param(op, "x", x, "beta", beta);
}

inline void check_lipswish_backward(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                    const at::Tensor& beta) {
  check_tensor_and_param(op, "x", x, "beta", beta);
  check_matches(op, "grad", grad, "x", x);
}

inline void check_lipswish_double_backward(const char* op, const at::Tensor& grad, const at::Tensor& gg_x,
                                           const at::Tensor& gg_beta, const at::Tensor& x, const at::Tensor& beta) {
  check_lipswish_backward(op, grad, x, beta);
  check_matches(op, "gg_x", gg_x, "x", x);
  check_tensor_and_param(op, "x", x, "gg_beta", gg_beta);
}

}  // namespace resflow_cuda
