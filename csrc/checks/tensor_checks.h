// Argument checks and layout helpers shared by the CPU and CUDA bindings, so both backends
// refuse the same inputs with the same messages. Messages name the op, the argument, what was
// expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <vector>

namespace resflow_cuda {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, but got None");
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": expected ", name,
              " to have a floating-point dtype (float32, float64, float16 or bfloat16), but got ",
              t.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " to have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), but got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " to be on the device of ", ref_name, " (",
              ref.device(), "), but got ", t.device());
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": expected ", name, " to have the shape of ", ref_name, " ",
              ref.sizes(), ", but got ", t.sizes());
}

// A tensor that must match ref in dtype, device and shape (e.g. the gradient of an elementwise op).
inline void check_matches(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                          const at::Tensor& ref) {
  check_float_tensor(op, name, t);
  check_same_dtype(op, name, t, ref_name, ref);
  check_same_device(op, name, t, ref_name, ref);
  check_same_shape(op, name, t, ref_name, ref);
}

// A learnable scalar parameter such as LipSwish's beta: shape [1] as in the reference modules,
// or a 0-dim tensor.
inline void check_scalar_param(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, but got None");
  TORCH_CHECK(t.dim() <= 1 && t.numel() == 1, op, ": expected ", name,
              " to have shape [1] (or be 0-dimensional), but got shape ", t.sizes());
}

// A tensor x and a scalar parameter p of the same dtype and device (the LipSwish ops).
inline void check_tensor_and_param(const char* op, const char* x_name, const at::Tensor& x, const char* p_name,
                                   const at::Tensor& p) {
  check_float_tensor(op, x_name, x);
  check_scalar_param(op, p_name, p);
  check_same_dtype(op, p_name, p, x_name, x);
  check_same_device(op, p_name, p, x_name, x);
}

// Elementwise kernels walk their operands in storage order. When every operand is dense in the
// same memory format (contiguous, channels_last or channels_last_3d) they are used as they are
// and the outputs are allocated in that format; otherwise every operand is made contiguous.
// The fake kernels in resflow_cuda/ops.py follow the same rule (elementwise_format there).
struct ElementwiseOperands {
  std::vector<at::Tensor> tensors;
  at::MemoryFormat format;

  // An uninitialised output shaped and laid out like the operands.
  at::Tensor new_output() const {
    return at::empty(tensors.front().sizes(), tensors.front().options().memory_format(format));
  }
};

inline ElementwiseOperands elementwise_operands(std::initializer_list<at::Tensor> operands) {
  for (const at::MemoryFormat format :
       {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast, at::MemoryFormat::ChannelsLast3d}) {
    bool all = true;
    for (const at::Tensor& t : operands) {
      all = all && t.is_contiguous(format);
    }
    if (all) {
      return {std::vector<at::Tensor>(operands), format};
    }
  }
  std::vector<at::Tensor> out;
  out.reserve(operands.size());
  for (const at::Tensor& t : operands) {
    out.push_back(t.contiguous());
  }
  return {std::move(out), at::MemoryFormat::Contiguous};
}

}  // namespace resflow_cuda
