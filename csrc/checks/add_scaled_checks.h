// Argument checks and operand layout of foreach_add_scaled, shared by the CPU and CUDA bindings so
// that both refuse the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "checks/tensor_checks.h"

namespace resflow_cuda {

constexpr const char* kAddScaledOp = "resflow_cuda.foreach_add_scaled";

// a[i] and b[i]: one float dtype, device and shape each pair; scale: one element of every pair's dtype, on
// every pair's device.
inline void check_add_scaled(at::TensorList a, at::TensorList b, const at::Tensor& scale) {
  TORCH_CHECK(a.size() == b.size(), kAddScaledOp, ": expected a and b to have the same number of tensors, but got ",
              a.size(), " and ", b.size());
  check_float_tensor(kAddScaledOp, "scale", scale);
  TORCH_CHECK(scale.numel() == 1, kAddScaledOp, ": expected scale to have one element, but got shape ",
              scale.sizes());
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string a_name = "a[" + std::to_string(i) + "]";
    const std::string b_name = "b[" + std::to_string(i) + "]";
    check_float_tensor(kAddScaledOp, a_name.c_str(), a[i]);
    check_matches(kAddScaledOp, b_name.c_str(), b[i], a_name.c_str(), a[i]);
    check_same_dtype(kAddScaledOp, "scale", scale, a_name.c_str(), a[i]);
    check_same_device(kAddScaledOp, a_name.c_str(), a[i], "scale", scale);
  }
}

// The pairs as the kernels take them: every tensor contiguous (a copy where it is not); the outputs
// are new contiguous tensors.
struct AddScaledOperands {
  std::vector<at::Tensor> a, b, out;
};

inline AddScaledOperands add_scaled_operands(at::TensorList a, at::TensorList b) {
  AddScaledOperands ops;
  for (size_t i = 0; i < a.size(); ++i) {
    ops.a.push_back(a[i].contiguous());
    ops.b.push_back(b[i].contiguous());
    ops.out.push_back(at::empty(a[i].sizes(), a[i].options().memory_format(at::MemoryFormat::Contiguous)));
  }
  return ops;
}

}  // namespace resflow_cuda
