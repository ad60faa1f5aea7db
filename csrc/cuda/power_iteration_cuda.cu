// Power iteration for spectral / induced p->q norms, CUDA: registration of the shared binding
// (power_iteration_binding.h) on the CUDA backend. Dense: one launch for the whole loop
// (power_iteration_kernels.cuh); convolutions and large matrices: ATen for the operator and the
// grid-wide dual-map and stopping-test kernels. No host synchronisation per iteration.
#include <torch/library.h>

#include "cuda_utils.h"
#include "power_iteration_binding.h"

namespace resflow_cuda::cuda {
namespace {

PowerIterationResult power_iteration_cuda(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                          int64_t max_iterations, c10::optional<double> atol,
                                          c10::optional<double> rtol, double domain, double codomain, bool u_first) {
  return power_iteration_on(CudaBackend{}, weight, u, v, max_iterations, atol, rtol, domain, codomain, u_first);
}

PowerIterationResult conv_power_iteration_cuda(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                               at::IntArrayRef input_size, at::IntArrayRef stride,
                                               at::IntArrayRef padding, int64_t max_iterations,
                                               c10::optional<double> atol, c10::optional<double> rtol, double domain,
                                               double codomain, bool u_first) {
  return conv_power_iteration_on(CudaBackend{}, weight, u, v, input_size, stride, padding, max_iterations, atol, rtol,
                                 domain, codomain, u_first);
}

void power_iteration_update_cuda(at::TensorList weights, at::TensorList us, at::TensorList vs,
                                 at::TensorList sigmas, int64_t max_iterations, c10::optional<double> atol,
                                 c10::optional<double> rtol, double domain, double codomain, bool u_first) {
  power_iteration_update_on(CudaBackend{}, weights, us, vs, sigmas, max_iterations, atol, rtol, domain, codomain,
                            u_first);
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CUDA, m) {
  m.impl("power_iteration", &power_iteration_cuda);
  m.impl("conv_power_iteration", &conv_power_iteration_cuda);
  m.impl("power_iteration_update_", &power_iteration_update_cuda);
}

}  // namespace resflow_cuda::cuda
