// The fused dense block's CUDA kernels: registration of the shared tensor binding
// (dense_jacobian_binding.h) on the CUDA backend (cuda_utils.h); kernels in dense_jacobian_kernels.cuh
// over resflow/dense_jacobian_math.h. Contract as the CPU ops (csrc/cpu/dense_jacobian_cpu.cpp).
// Launches on the current stream; never synchronises with the host.
#include <torch/library.h>

#include "cuda_utils.h"
#include "dense_jacobian_binding.h"

namespace resflow_cuda::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jacobian_lipswish_cuda(const at::Tensor& z,
                                                                                  const std::optional<at::Tensor>& bias,
                                                                                  const at::Tensor& beta, int64_t batch,
                                                                                  bool keep) {
  return jacobian_lipswish_on(CudaBackend{}, z, bias, beta, batch, keep);
}

std::tuple<at::Tensor, at::Tensor> jacobian_lipswish_backward_cuda(const at::Tensor& grad, const at::Tensor& h,
                                                                   const at::Tensor& tangent, const at::Tensor& beta) {
  return jacobian_lipswish_backward_on(CudaBackend{}, grad, h, tangent, beta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jacobian_series_cuda(
    const at::Tensor& z, const std::optional<at::Tensor>& bias, const at::Tensor& eps,
    at::ArrayRef<double> logdet_coeffs, at::ArrayRef<double> neumann_coeffs) {
  return jacobian_series_on(CudaBackend{}, z, bias, eps, logdet_coeffs, neumann_coeffs);
}

at::Tensor jacobian_series_backward_cuda(const at::Tensor& z, const at::Tensor& eps, at::ArrayRef<double> logdet_coeffs,
                                         const at::Tensor& grad_logdet, const at::Tensor& grad_g) {
  return jacobian_series_backward_on(CudaBackend{}, z, eps, logdet_coeffs, grad_logdet, grad_g);
}

void lipschitz_normalize_cuda(at::TensorList weights, at::TensorList us, at::TensorList vs,
                              at::ArrayRef<double> coeffs, at::TensorList out, const at::Tensor& sigmas,
                              at::TensorList scales) {
  lipschitz_normalize_on(CudaBackend{}, weights, us, vs, coeffs, out, sigmas, scales);
}

std::vector<at::Tensor> lipschitz_normalize_backward_cuda(at::TensorList grads, at::TensorList weights,
                                                          at::TensorList us, at::TensorList vs,
                                                          const at::Tensor& sigmas, at::ArrayRef<double> coeffs,
                                                          const c10::List<bool>& detach_sigma) {
  return lipschitz_normalize_backward_on(CudaBackend{}, grads, weights, us, vs, sigmas, coeffs, detach_sigma);
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CUDA, m) {
  m.impl("jacobian_lipswish", &jacobian_lipswish_cuda);
  m.impl("jacobian_lipswish_backward", &jacobian_lipswish_backward_cuda);
  m.impl("jacobian_series", &jacobian_series_cuda);
  m.impl("jacobian_series_backward", &jacobian_series_backward_cuda);
  m.impl("lipschitz_normalize_", &lipschitz_normalize_cuda);
  m.impl("lipschitz_normalize_backward", &lipschitz_normalize_backward_cuda);
}

}  // namespace resflow_cuda::cuda
