// actnorm and actnorm_backward on CUDA: registration of the shared tensor bindings (actnorm_binding.h) on the
// CUDA backend (cuda_utils.h). Contract as the CPU ops (csrc/cpu/actnorm_cpu.cpp). Launch on the current
// stream; never synchronise.
#include <torch/library.h>

#include "actnorm_binding.h"
#include "cuda_utils.h"

namespace resflow_cuda::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> actnorm_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                                const std::optional<at::Tensor>& logp, int64_t sign) {
  return actnorm_on(CudaBackend{}, x, weight, bias, logp, sign);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_backward_cuda(const at::Tensor& grad_y,
                                                                     const std::optional<at::Tensor>& grad_logp,
                                                                     const at::Tensor& x, const at::Tensor& weight,
                                                                     const at::Tensor& bias, int64_t sign) {
  return actnorm_backward_on(CudaBackend{}, grad_y, grad_logp, x, weight, bias, sign);
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CUDA, m) {
  m.impl("actnorm", &actnorm_cuda);
  m.impl("actnorm_backward", &actnorm_backward_cuda);
}

}  // namespace resflow_cuda::cuda
