// LipSwish CUDA ops (Residual Flows, Chen et al. 2019): registration of the shared tensor binding
// (lipswish_binding.h) on the CUDA backend (cuda_utils.h); kernels in lipswish_kernels.cuh over
// resflow/lipswish_math.h. Contract as the CPU ops (csrc/cpu/lipswish_cpu.cpp): x any shape and
// strides (float32/64, float16, bfloat16; half types compute in float), beta shape [1] or 0-dim on
// the same device. Launches on the current stream of x's device; never synchronises with the host.
#include <torch/library.h>

#include "cuda_utils.h"
#include "lipswish_binding.h"

namespace resflow_cuda::cuda {
namespace {

at::Tensor lipswish_cuda(const at::Tensor& x, const at::Tensor& beta) {
  return std::get<0>(lipswish_forward_on(CudaBackend{}, "resflow_cuda.lipswish", x, beta, false));
}

std::tuple<at::Tensor, at::Tensor> lipswish_with_derivative_cuda(const at::Tensor& x, const at::Tensor& beta) {
  return lipswish_forward_on(CudaBackend{}, "resflow_cuda.lipswish_with_derivative", x, beta, true);
}

std::tuple<at::Tensor, at::Tensor> lipswish_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& beta) {
  return lipswish_backward_on(CudaBackend{}, grad, x, beta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lipswish_double_backward_cuda(const at::Tensor& grad,
                                                                             const at::Tensor& gg_x,
                                                                             const at::Tensor& gg_beta,
                                                                             const at::Tensor& x,
                                                                             const at::Tensor& beta) {
  return lipswish_double_backward_on(CudaBackend{}, grad, gg_x, gg_beta, x, beta);
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CUDA, m) {
  m.impl("lipswish", &lipswish_cuda);
  m.impl("lipswish_with_derivative", &lipswish_with_derivative_cuda);
  m.impl("lipswish_backward", &lipswish_backward_cuda);
  m.impl("lipswish_double_backward", &lipswish_double_backward_cuda);
}

}  // namespace resflow_cuda::cuda
