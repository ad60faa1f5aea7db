// foreach_add_scaled on CUDA: registration of the shared tensor binding (add_scaled_binding.h) on the CUDA
// backend (cuda_utils.h). Contract as the CPU op (csrc/cpu/add_scaled_cpu.cpp). Launches on the current
// stream; never synchronises.
#include <torch/library.h>

#include "add_scaled_binding.h"
#include "cuda_utils.h"

namespace resflow_cuda::cuda {
namespace {

std::vector<at::Tensor> foreach_add_scaled_cuda(at::TensorList a, at::TensorList b, const at::Tensor& scale) {
  return foreach_add_scaled_on(CudaBackend{}, a, b, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CUDA, m) {
  m.impl("foreach_add_scaled", &foreach_add_scaled_cuda);
}

}  // namespace resflow_cuda::cuda
