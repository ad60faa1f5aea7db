// Argument checks and operand layout of actnorm and actnorm_backward, shared by the CPU and CUDA bindings
// so that both refuse the same inputs with the same messages.
//
// Layout: x (and grad_y) is read as B rows of C channels of S positions (x's shape (B, C, *spatial),
// contiguous; another layout is copied to contiguous first); y and grad_x are contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>

#include "checks/tensor_checks.h"

namespace resflow_cuda {

constexpr const char* kActNormOp = "resflow_cuda.actnorm";
constexpr const char* kActNormBackwardOp = "resflow_cuda.actnorm_backward";

inline bool actnorm_given(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// x (B, C, ...); weight and bias (C,) of x's dtype and device; logp (and its gradient) B values (shape (B, 1) or
// (B,)) of x's dtype and device; sign -1 or 1.
inline void check_actnorm(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const std::optional<at::Tensor>& logp, const char* logp_name, int64_t sign) {
  check_float_tensor(op, "x", x);
  TORCH_CHECK(x.dim() >= 2, op, ": expected x to have shape (B, C, ...), but got ", x.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"weight", &weight}, {"bias", &bias}}) {
    check_float_tensor(op, name, *t);
    check_same_dtype(op, name, *t, "x", x);
    check_same_device(op, name, *t, "x", x);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": expected ", name, " to have shape [", x.size(1),
                "] (one value per channel of x), but got ", t->sizes());
  }
  if (actnorm_given(logp)) {
    check_float_tensor(op, logp_name, *logp);
    check_same_dtype(op, logp_name, *logp, "x", x);
    check_same_device(op, logp_name, *logp, "x", x);
    TORCH_CHECK(logp->dim() >= 1 && logp->size(0) == x.size(0) && logp->numel() == x.size(0), op, ": expected ",
                logp_name, " to have one value per sample of x (shape [", x.size(0), ", 1] or [", x.size(0),
                "]), but got ", logp->sizes());
  }
  TORCH_CHECK(sign == 1 || sign == -1, op, ": expected sign to be 1 or -1, but got ", sign);
}

struct ActNormShape {
  int64_t batch = 0, channels = 0, positions = 0;
};

inline ActNormShape actnorm_shape(const at::Tensor& x) {
  ActNormShape s;
  s.batch = x.size(0);
  s.channels = x.size(1);
  s.positions = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    s.positions *= x.size(d);
  }
  return s;
}

// The operands of actnorm after its checks: x, weight, bias and logp contiguous, and the outputs y and
// logp_out (empty without logp).
struct ActNormOperands {
  at::Tensor x, weight, bias, logp, y, logp_out;
  ActNormShape shape;
};

inline ActNormOperands actnorm_operands(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                        const std::optional<at::Tensor>& logp, int64_t sign) {
  check_actnorm(kActNormOp, x, weight, bias, logp, "logp", sign);
  ActNormOperands ops;
  ops.x = x.contiguous();
  ops.weight = weight.contiguous();
  ops.bias = bias.contiguous();
  ops.shape = actnorm_shape(ops.x);
  ops.y = at::empty(x.sizes(), x.options());
  ops.logp = actnorm_given(logp) ? logp->contiguous() : at::Tensor();
  ops.logp_out = actnorm_given(logp) ? at::empty(logp->sizes(), x.options()) : at::empty({0}, x.options());
  return ops;
}

// The operands of actnorm_backward after its checks: the inputs contiguous (grad_logp undefined when not
// given) and the outputs grad_x, grad_weight, grad_bias.
struct ActNormBackwardOperands {
  at::Tensor grad_y, grad_logp, x, weight, bias, grad_x, grad_weight, grad_bias;
  ActNormShape shape;
};

inline ActNormBackwardOperands actnorm_backward_operands(const at::Tensor& grad_y,
                                                         const std::optional<at::Tensor>& grad_logp,
                                                         const at::Tensor& x, const at::Tensor& weight,
                                                         const at::Tensor& bias, int64_t sign) {
  check_actnorm(kActNormBackwardOp, x, weight, bias, grad_logp, "grad_logp", sign);
  check_matches(kActNormBackwardOp, "grad_y", grad_y, "x", x);
  ActNormBackwardOperands ops;
  ops.grad_y = grad_y.contiguous();
  ops.grad_logp = actnorm_given(grad_logp) ? grad_logp->contiguous() : at::Tensor();
  ops.x = x.contiguous();
  ops.weight = weight.contiguous();
  ops.bias = bias.contiguous();
  ops.shape = actnorm_shape(ops.x);
  ops.grad_x = at::empty(x.sizes(), x.options());
  ops.grad_weight = at::empty({ops.shape.channels}, x.options());
  ops.grad_bias = at::empty({ops.shape.channels}, x.options());
  return ops;
}

}  // namespace resflow_cuda
