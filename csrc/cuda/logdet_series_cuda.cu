// logdet_series_accumulate_ on CUDA: registration of the shared tensor binding
// (logdet_series_binding.h) on the CUDA backend (cuda_utils.h). Contract as the CPU op
// (csrc/cpu/logdet_series_cpu.cpp). Launches on the current stream; never synchronises.
#include <torch/library.h>

#include "cuda_utils.h"
#include "logdet_series_binding.h"

namespace resflow_cuda::cuda {
namespace {

void logdet_series_accumulate_cuda(const at::Tensor& w, const at::Tensor& eps, const at::Tensor& logdet,
                                   const std::optional<at::Tensor>& neumann, double logdet_coeff,
                                   double neumann_coeff, const std::optional<at::Tensor>& scale) {
  logdet_series_accumulate_on(CudaBackend{}, w, eps, logdet, neumann, logdet_coeff, neumann_coeff, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CUDA, m) {
  m.impl("logdet_series_accumulate_", &logdet_series_accumulate_cuda);
}

}  // namespace resflow_cuda::cuda
