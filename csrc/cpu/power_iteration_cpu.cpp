// Power iteration for spectral and induced p->q norms, CPU: the reference's loop in ATen ops
// (power_iteration_aten.h), so u, v, sigma and the iteration count equal the reference's bit
// for bit, without Python between the steps. Dense (one matrix or a batch of equal shape) and
// convolution operators (conv2d / conv_transpose2d on a 1 x C x H x W input).
// Contract: weight, u, v of one floating dtype; float16/bfloat16 compute in float32. Returns u and v
// in that dtype, sigma in the compute dtype and the iteration count (int64), per matrix.
#include <torch/library.h>

#include "../power_iteration_common.h"

namespace resflow_cuda::cpu {
namespace {

PowerIterationResult power_iteration_cpu(
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, int64_t max_iterations,
    c10::optional<double> atol, c10::optional<double> rtol, double domain, double codomain, bool u_first) {
  constexpr const char* op = "resflow_cuda.power_iteration";
  check_dense_power_iteration(op, weight, u, v);
  const auto opt = power_iteration_options(op, max_iterations, atol, rtol, domain, codomain, u_first);
  return power_iteration_in_compute_type(weight, u, v, [&](const at::Tensor& w, const at::Tensor& u0, const at::Tensor& v0) {
    return dense_power_iteration_aten(w, u0, v0, opt, ConvergenceCheck::HostCheck);
  });
}

PowerIterationResult conv_power_iteration_cpu(
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, at::IntArrayRef input_size,
    at::IntArrayRef stride, at::IntArrayRef padding, int64_t max_iterations, c10::optional<double> atol,
    c10::optional<double> rtol, double domain, double codomain, bool u_first) {
  constexpr const char* op = "resflow_cuda.conv_power_iteration";
  const ConvGeometry g = check_conv_power_iteration(op, weight, u, v, input_size, stride, padding);
  const auto opt = power_iteration_options(op, max_iterations, atol, rtol, domain, codomain, u_first);
  return power_iteration_in_compute_type(weight, u, v, [&](const at::Tensor& w, const at::Tensor& u0, const at::Tensor& v0) {
    return run_power_iteration(conv_operator(w, g), u0, v0, opt, ConvergenceCheck::HostCheck);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CPU, m) {
  m.impl("power_iteration", &power_iteration_cpu);
  m.impl("conv_power_iteration", &conv_power_iteration_cpu);
}

}  // namespace resflow_cuda::cpu
