// Runtime choice among the CPU kernel sets this build compiled (DEFAULT everywhere; AVX2 and
// AVX512 on x86-64), the way ATen picks its own: the files in csrc/cpu/vec are compiled once per
// capability with the matching -m flags (setup.py, CMakeLists.txt) into namespaces DEFAULT,
// AVX2 and AVX512, and each call site picks one with RESFLOW_CPU_PICK.
#pragma once

#include <string>
#include <vector>

namespace resflow_cuda::cpu {

enum class CpuCapability { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The best compiled set the running CPU supports, as torch itself decides it (so the
// ATEN_CPU_CAPABILITY environment variable lowers it for both), unless an override is set.
CpuCapability cpu_capability();

// Test hook: force a capability ("default", "avx2", "avx512"), or "" to follow torch again.
// Asking for one the CPU or the build lacks is an error.
void set_cpu_capability_override(const std::string& name);

std::string cpu_capability_name(CpuCapability cap);
std::vector<std::string> compiled_cpu_capabilities();

template <class Fn>
Fn pick_kernel(Fn default_fn, Fn avx2_fn, Fn avx512_fn) {
  switch (cpu_capability()) {
    case CpuCapability::AVX512:
      return avx512_fn;
    case CpuCapability::AVX2:
      return avx2_fn;
    default:
      return default_fn;
  }
}

}  // namespace resflow_cuda::cpu

#if defined(RESFLOW_CPU_X86_CAPABILITIES)
// Declares DECLS once in each capability namespace.
#define RESFLOW_DECLARE_PER_CPU_CAPABILITY(DECLS) \
  namespace DEFAULT {                             \
  DECLS                                           \
  }                                               \
  namespace AVX2 {                                \
  DECLS                                           \
  }                                               \
  namespace AVX512 {                              \
  DECLS                                           \
  }
#define RESFLOW_CPU_PICK(FN) ::resflow_cuda::cpu::pick_kernel(&DEFAULT::FN, &AVX2::FN, &AVX512::FN)
#else
#define RESFLOW_DECLARE_PER_CPU_CAPABILITY(DECLS) \
  namespace DEFAULT {                             \
  DECLS                                           \
  }
#define RESFLOW_CPU_PICK(FN) (&DEFAULT::FN)
#endif
