// The Python module resflow_cuda._C. Loading it runs the static TORCH_LIBRARY registrations of
// every op; the module itself only carries build information and test hooks (no ops: those are
// reached through torch.ops.resflow_cuda). Kept in its own light translation unit.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/cpu_capability.h"
#include "version.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "resflow_cuda compiled extension: op registrations, build information, test hooks";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["torch_version"] = resflow_cuda::built_torch_version();
        info["cuda"] = resflow_cuda::built_with_cuda();
        const int64_t v = resflow_cuda::cuda_version();
        info["cuda_version"] = v < 0 ? py::object(py::none())
                                     : py::object(py::str(std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10)));
        info["cuda_arch_list"] = resflow_cuda::built_cuda_arch_list();
        info["no_cuda_reason"] = resflow_cuda::no_cuda_reason();
        info["cpu_capabilities"] = resflow_cuda::cpu::compiled_cpu_capabilities();
        return info;
      },
      "What this extension was built with.");
  m.def(
      "cpu_capability", [] { return resflow_cuda::cpu::cpu_capability_name(resflow_cuda::cpu::cpu_capability()); },
      "The CPU kernel set the ops use now (default, avx2 or avx512).");
  m.def("_set_cpu_capability", &resflow_cuda::cpu::set_cpu_capability_override, py::arg("name"),
        "Test hook: force a CPU kernel set by name, or '' to follow torch's choice again.");
}
