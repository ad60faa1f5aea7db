// Power iteration for spectral / induced p->q norms, CUDA: registration and the CUDA backend of
// the shared binding (power_iteration_binding.h). Dense: one launch per call for the whole loop
// (power_iteration_kernels.cuh); convolution: ATen convolutions with a device-side convergence
// flag. No host synchronisation per iteration.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_utils.h"
#include "power_iteration_binding.h"

namespace resflow_cuda::cuda {
namespace {

struct CudaBackend {
  c10::cuda::CUDAGuard guard(const at::Tensor& t) const { return c10::cuda::CUDAGuard(t.device()); }
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream(); }
  size_t max_shared_bytes() const { return kDefaultMaxSharedBytes; }
  void check_launch() const { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
};

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
