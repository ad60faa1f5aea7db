// Build facts of this extension (see version.h). The RESFLOW_BUILD_* strings come from the
// build system; defaults keep a hand-rolled build compiling.
#include "version.h"

#include <sstream>

#if defined(RESFLOW_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#ifndef RESFLOW_BUILD_TORCH_VERSION
#define RESFLOW_BUILD_TORCH_VERSION "unknown"
#endif
#ifndef RESFLOW_BUILD_CUDA_ARCH_LIST
#define RESFLOW_BUILD_CUDA_ARCH_LIST ""
#endif
#ifndef RESFLOW_BUILD_NO_CUDA_REASON
#define RESFLOW_BUILD_NO_CUDA_REASON "built without RESFLOW_WITH_CUDA"
#endif

namespace resflow_cuda {

int64_t cuda_version() {
#if defined(RESFLOW_WITH_CUDA)
  return CUDART_VERSION;
#else
  return -1;
#endif
}

bool built_with_cuda() { return cuda_version() >= 0; }

std::string built_torch_version() { return RESFLOW_BUILD_TORCH_VERSION; }

std::vector<std::string> built_cuda_arch_list() {
  std::vector<std::string> archs;
  std::stringstream list(RESFLOW_BUILD_CUDA_ARCH_LIST);
  std::string arch;
  while (std::getline(list, arch, ';')) {
    if (!arch.empty()) {
      archs.push_back(arch);
    }
  }
  return archs;
}

std::string no_cuda_reason() { return built_with_cuda() ? "" : RESFLOW_BUILD_NO_CUDA_REASON; }

}  // namespace resflow_cuda
