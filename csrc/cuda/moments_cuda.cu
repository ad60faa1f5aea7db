// moments_ on CUDA: registration of the shared tensor binding (moments_binding.h) on the CUDA
// backend (cuda_utils.h). Contract as the CPU op (csrc/cpu/moments_cpu.cpp). Launches on the
// current stream; never synchronises.
#include <torch/library.h>

#include "cuda_utils.h"
#include "moments_binding.h"

namespace resflow_cuda::cuda {
namespace {

void moments_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& mean_square) {
  moments_on(CudaBackend{}, x, mean, mean_square);
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CUDA, m) {
  m.impl("moments_", &moments_cuda);
}

}  // namespace resflow_cuda::cuda
