// Build facts of this extension, recorded at compile time by setup.py / CMakeLists.txt.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace resflow_cuda {

// CUDART_VERSION the CUDA kernels were compiled with (e.g. 13000), or -1 in a CPU-only build.
int64_t cuda_version();
bool built_with_cuda();
std::string built_torch_version();
std::vector<std::string> built_cuda_arch_list();
// Why a build has no CUDA kernels (empty when it has them).
std::string no_cuda_reason();

}  // namespace resflow_cuda
