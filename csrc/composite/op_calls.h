// Typed calls of this library's ops that more than one composite op makes: through the dispatcher, so
// each call reaches the device's kernel (CPU, CUDA, or the emulation) and counts as one op.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace resflow_cuda {

// The LipSwish step of a forward-mode stack backwards (csrc/cpu/dense_jacobian_cpu.cpp): grad holds the
// co-tangents of the primal rows and of every tangent block; returns [dh; dt_1 ...] and beta's gradient.
inline std::tuple<at::Tensor, at::Tensor> jacobian_lipswish_backward(const at::Tensor& grad, const at::Tensor& h,
                                                                     const at::Tensor& t, const at::Tensor& beta) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resflow_cuda::jacobian_lipswish_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&)>();
  return op.call(grad, h, t, beta);
}

}  // namespace resflow_cuda
