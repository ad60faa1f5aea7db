// Runtime CPU capability selection; see cpu_capability.h.
#include "cpu_capability.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <atomic>

namespace resflow_cuda::cpu {
namespace {

constexpr int kNoOverride = -1;
std::atomic<int> g_override{kNoOverride};

#if defined(RESFLOW_CPU_X86_CAPABILITIES)
constexpr CpuCapability kBestCompiled = CpuCapability::AVX512;
#else
constexpr CpuCapability kBestCompiled = CpuCapability::DEFAULT;
#endif

CpuCapability capability_from_torch() {
  // at::get_cpu_capability() names the set ATen dispatches to on this CPU; it already folds in
  // ATEN_CPU_CAPABILITY. Our AVX2/AVX512 sets use the same -m flags as ATen's.
  const std::string name = at::get_cpu_capability();
  CpuCapability cap = CpuCapability::DEFAULT;
  if (name.rfind("AVX512", 0) == 0) {
    cap = CpuCapability::AVX512;
  } else if (name == "AVX2") {
    cap = CpuCapability::AVX2;
  }
  return static_cast<int>(cap) <= static_cast<int>(kBestCompiled) ? cap : kBestCompiled;
}

}  // namespace

CpuCapability cpu_capability() {
  static const CpuCapability detected = capability_from_torch();
  const int forced = g_override.load(std::memory_order_relaxed);
  return forced == kNoOverride ? detected : static_cast<CpuCapability>(forced);
}

std::string cpu_capability_name(CpuCapability cap) {
  switch (cap) {
    case CpuCapability::AVX512:
      return "avx512";
    case CpuCapability::AVX2:
      return "avx2";
    default:
      return "default";
  }
}

std::vector<std::string> compiled_cpu_capabilities() {
  std::vector<std::string> names;
  for (int c = 0; c <= static_cast<int>(kBestCompiled); ++c) {
    names.push_back(cpu_capability_name(static_cast<CpuCapability>(c)));
  }
  return names;
}

void set_cpu_capability_override(const std::string& name) {
  if (name.empty()) {
    g_override.store(kNoOverride);
    return;
  }
  const CpuCapability supported = capability_from_torch();
  for (int c = 0; c <= static_cast<int>(kBestCompiled); ++c) {
    if (cpu_capability_name(static_cast<CpuCapability>(c)) == name) {
      TORCH_CHECK(c <= static_cast<int>(supported), "set_cpu_capability_override: this CPU supports up to '",
                  cpu_capability_name(supported), "', but '", name, "' was requested");
      g_override.store(c);
      return;
    }
  }
  TORCH_CHECK(false, "set_cpu_capability_override: expected one of the compiled capabilities (",
              c10::Join(", ", compiled_cpu_capabilities()), ") or an empty string, but got '", name, "'");
}

}  // namespace resflow_cuda::cpu
