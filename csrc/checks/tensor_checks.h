// Argument checks and layout helpers shared by the CPU and CUDA bindings, so both backends
// refuse the same inputs with the same messages. Messages name the op, the argument, what was
// expected and what was given.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <unordered_map>
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

// Whether a and b may refer to a common memory location. ATen decides dense tensors exactly; for
// a strided view (e.g. a column of a matrix) it gives up, and then two tensors of one storage whose
// address spans intersect count as sharing memory. That refuses interleaved views that would not
// collide (e.g. x[0::2] and x[1::2]), which an in-place op has no reason to be given.
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  switch (at::get_overlap_status(a, b)) {
    case at::MemOverlapStatus::Full:
    case at::MemOverlapStatus::Partial:
      return true;
    case at::MemOverlapStatus::No:
      return false;
    case at::MemOverlapStatus::TooHard:
      break;
  }
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      !a.storage().is_alias_of(b.storage())) {
    return false;
  }
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;  // element offset of the last element from the first (strides are >= 0)
    for (int64_t d = 0; d < t.dim(); ++d) {
      last += (t.size(d) - 1) * t.stride(d);
    }
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return std::pair<uintptr_t, uintptr_t>{begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
  };
  const auto [a_begin, a_end] = span(a);
  const auto [b_begin, b_end] = span(b);
  return a_begin < b_end && b_begin < a_end;
}

// A tensor and the name the op's schema gives it, with its position for list arguments ("us", 2
// reads "us[2]"; -1 for a plain argument). The name is spelled out only in an error message.
struct NamedTensor {
  const char* name;
  int64_t index;
  const at::Tensor* tensor;
};

inline std::string tensor_name(const NamedTensor& t) {
  return t.index < 0 ? std::string(t.name) : std::string(t.name) + "[" + std::to_string(t.index) + "]";
}

// The one aliasing check of the in-place ops: no output has internally overlapping elements
// (e.g. an expanded tensor), and no output shares memory with an input or with another output,
// since the kernels read inputs while they write outputs and an aliased write gives wrong results
// without an error. Inputs may alias each other. Null or undefined tensors (an omitted optional
// output) are skipped. Only tensors of one storage are compared, so long lists cost linear time.
inline void check_no_overlap(const char* op, const std::vector<NamedTensor>& outputs,
                             const std::vector<NamedTensor>& inputs) {
  std::unordered_map<const void*, std::vector<const NamedTensor*>> seen;  // by storage
  const auto key = [](const at::Tensor& t) -> const void* {
    return t.has_storage() ? static_cast<const void*>(t.storage().unsafeGetStorageImpl()) : nullptr;
  };
  for (const NamedTensor& out : outputs) {
    if (out.tensor == nullptr || !out.tensor->defined()) {
      continue;
    }
    const at::Tensor& t = *out.tensor;
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": expected ", tensor_name(out),
                " not to have overlapping elements (it is written in place), but got an expanded tensor with strides ",
                t.strides());
    auto& same_storage = seen[key(t)];
    for (const NamedTensor* other : same_storage) {
      TORCH_CHECK(!may_share_memory(t, *other->tensor), op, ": expected ", tensor_name(out),
                  " not to share memory with ", tensor_name(*other), " (both are written in place), but they overlap");
    }
    same_storage.push_back(&out);
  }
  for (const NamedTensor& in : inputs) {
    if (in.tensor == nullptr || !in.tensor->defined()) {
      continue;
    }
    const at::Tensor& t = *in.tensor;
    const auto found = seen.find(key(t));
    if (found == seen.end()) {
      continue;
    }
    for (const NamedTensor* out : found->second) {
      TORCH_CHECK(!may_share_memory(*out->tensor, t), op, ": expected ", tensor_name(*out),
                  " not to share memory with ", tensor_name(in), " (", tensor_name(*out), " is written in place, ",
                  tensor_name(in), " is read), but they overlap");
    }
  }
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
