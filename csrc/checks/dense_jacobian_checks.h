// Argument checks of the fused dense-block kernels (the forward-mode Jacobian stack and the Lipschitz
// weight normalization), shared by the CPU and CUDA bindings so that both refuse the same inputs with
// the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

#include "checks/tensor_checks.h"

namespace resflow_cuda {

inline void check_float_or_double(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, but got None");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": expected ", name,
              " to be float32 or float64, but got ", t.scalar_type());
}

inline void check_matrix(const char* op, const char* name, const at::Tensor& t) {
  check_float_or_double(op, name, t);
  TORCH_CHECK(t.dim() == 2, op, ": expected ", name, " to be 2-dimensional, but got shape ", t.sizes());
}

// An optional bias of `width` entries with the dtype and device of ref.
inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t width, const at::Tensor& ref,
                       const char* ref_name) {
  if (!bias.has_value() || !bias->defined()) {
    return;
  }
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == width, op, ": expected bias of shape [", width, "], but got ",
              bias->sizes());
  check_same_dtype(op, "bias", *bias, ref_name, ref);
  check_same_device(op, "bias", *bias, ref_name, ref);
}

// A stack of S >= 1 blocks of `batch` rows.
inline int64_t check_stack(const char* op, const char* name, const at::Tensor& z, int64_t batch) {
  check_matrix(op, name, z);
  TORCH_CHECK(batch >= 0, op, ": expected batch >= 0, but got ", batch);
  const int64_t rows = z.size(0);
  TORCH_CHECK(batch == 0 ? rows == 0 : rows >= batch && rows % batch == 0, op, ": expected ", name,
              " to have a positive multiple of batch (", batch, ") rows, but got ", rows);
  return batch == 0 ? 0 : rows / batch;
}

inline void check_jacobian_lipswish(const char* op, const at::Tensor& z, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& beta, int64_t batch) {
  check_stack(op, "z", z, batch);
  check_bias(op, bias, z.size(1), z, "z");
  check_tensor_and_param(op, "z", z, "beta", beta);
}

// jacobian_lipswish's operands made contiguous and its outputs allocated: h (B, H), a like z and, with keep
// (and at least two blocks), kept_a (2 B, H) and kept_t (B, H), else both with no rows.
struct JacobianLipSwishOperands {
  at::Tensor z, bias, h, a, kept_a, kept_t;
  int64_t width = 0, blocks = 0;
  bool keep = false;
};

inline JacobianLipSwishOperands jacobian_lipswish_operands(const char* op, const at::Tensor& z,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& beta, int64_t batch, bool keep) {
  check_jacobian_lipswish(op, z, bias, beta, batch);
  JacobianLipSwishOperands o;
  o.z = z.contiguous();
  o.bias = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  o.width = z.size(1);
  o.blocks = batch == 0 ? 0 : z.size(0) / batch;
  o.keep = keep && o.blocks >= 2;
  o.h = at::empty({batch, o.width}, z.options());
  o.a = at::empty(z.sizes(), z.options());
  o.kept_a = at::empty({o.keep ? 2 * batch : 0, o.width}, z.options());
  o.kept_t = at::empty({o.keep ? batch : 0, o.width}, z.options());
  return o;
}

// grad: the co-tangents of the primal rows (B) and of the tangent rows (T blocks of B) of a stack; h (B, H)
// the primal pre-activation; tangent (T B, H) the tangents' pre-activations.
inline void check_jacobian_lipswish_backward(const char* op, const at::Tensor& grad, const at::Tensor& h,
                                             const at::Tensor& tangent, const at::Tensor& beta) {
  check_matrix(op, "h", h);
  check_matrix(op, "tangent", tangent);
  check_matrix(op, "grad", grad);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"tangent", tangent},
                                std::pair<const char*, const at::Tensor&>{"grad", grad}}) {
    check_same_dtype(op, name, t, "h", h);
    check_same_device(op, name, t, "h", h);
  }
  const int64_t batch = h.size(0);
  TORCH_CHECK(tangent.size(1) == h.size(1) && (batch == 0 ? tangent.size(0) == 0 : tangent.size(0) % batch == 0), op,
              ": expected tangent to have ", h.size(1), " columns and a multiple of h's ", batch,
              " rows, but got shape ", tangent.sizes());
  TORCH_CHECK(grad.size(0) == batch + tangent.size(0) && grad.size(1) == h.size(1), op,
              ": expected grad of shape [", batch + tangent.size(0), ", ", h.size(1),
              "] (the primal and tangent rows), but got ", grad.sizes());
  check_tensor_and_param(op, "h", h, "beta", beta);
}

// jacobian_lipswish_backward's operands made contiguous and its output allocated (like grad).
struct JacobianLipSwishBackwardOperands {
  at::Tensor grad, h, tangent, out;
};

inline JacobianLipSwishBackwardOperands jacobian_lipswish_backward_operands(const char* op, const at::Tensor& grad,
                                                                            const at::Tensor& h,
                                                                            const at::Tensor& tangent,
                                                                            const at::Tensor& beta) {
  check_jacobian_lipswish_backward(op, grad, h, tangent, beta);
  JacobianLipSwishBackwardOperands o{grad.contiguous(), h.contiguous(), tangent.contiguous(), at::Tensor()};
  o.out = at::empty(grad.sizes(), grad.options());
  return o;
}

inline void check_jacobian_series(const char* op, const at::Tensor& z, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& eps, size_t logdet_terms, size_t neumann_terms) {
  check_matrix(op, "eps", eps);
  check_matrix(op, "z", z);
  check_same_dtype(op, "z", z, "eps", eps);
  check_same_device(op, "z", z, "eps", eps);
  const int64_t batch = eps.size(0);
  const int64_t dim = eps.size(1);
  TORCH_CHECK(z.size(0) == (2 + dim) * batch && z.size(1) == dim, op, ": expected z of shape [", (2 + dim) * batch,
              ", ", dim, "] (2 + D blocks of the batch's rows, eps of shape ", eps.sizes(), "), but got ", z.sizes());
  check_bias(op, bias, dim, eps, "eps");
  TORCH_CHECK(neumann_terms == 0 || neumann_terms == logdet_terms, op, ": expected neumann_coeffs to be empty or ",
              "to have one entry per term (", logdet_terms, "), but got ", neumann_terms);
}

// jacobian_series' operands made contiguous and its outputs allocated (CPU and CUDA alike): g (B, D), the
// log-det and the surrogate (B,) in the accumulation type (the surrogate empty without neumann_coeffs),
// w~ (B, D) (empty without neumann_coeffs).
struct JacobianSeriesOperands {
  at::Tensor z, eps, bias, g, logdet, value, w_tilde;
  int64_t batch = 0, dim = 0;
  bool neumann = false;
};

inline JacobianSeriesOperands jacobian_series_operands(const char* op, const at::Tensor& z,
                                                        const std::optional<at::Tensor>& bias, const at::Tensor& eps,
                                                        size_t logdet_terms, size_t neumann_terms) {
  check_jacobian_series(op, z, bias, eps, logdet_terms, neumann_terms);
  JacobianSeriesOperands o;
  o.z = z.contiguous();
  o.eps = eps.contiguous();
  o.bias = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  o.batch = eps.size(0);
  o.dim = eps.size(1);
  o.neumann = neumann_terms > 0;
  const auto acc = eps.options().dtype(eps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  o.g = at::empty({o.batch, o.dim}, eps.options());
  o.logdet = at::empty({o.batch}, acc);
  o.value = at::empty({o.neumann ? o.batch : 0}, acc);
  o.w_tilde = o.neumann ? at::empty({o.batch, o.dim}, eps.options()) : at::empty({0}, eps.options());
  return o;
}

inline void check_jacobian_series_backward(const char* op, const at::Tensor& z, const at::Tensor& eps,
                                           const at::Tensor& grad_logdet, const at::Tensor& grad_g) {
  check_jacobian_series(op, z, std::nullopt, eps, 0, 0);
  check_matches(op, "grad_g", grad_g, "eps", eps);
  TORCH_CHECK(grad_logdet.dim() == 1 && grad_logdet.size(0) == eps.size(0), op, ": expected grad_logdet of shape [",
              eps.size(0), "], but got ", grad_logdet.sizes());
  check_same_device(op, "grad_logdet", grad_logdet, "eps", eps);
}

// jacobian_series_backward's operands made contiguous (grad_logdet in eps' dtype) and the seed allocated
// (like z).
struct JacobianSeriesBackwardOperands {
  at::Tensor z, eps, grad_logdet, grad_g, seed;
  int64_t batch = 0, dim = 0;
};

inline JacobianSeriesBackwardOperands jacobian_series_backward_operands(const char* op, const at::Tensor& z,
                                                                        const at::Tensor& eps,
                                                                        const at::Tensor& grad_logdet,
                                                                        const at::Tensor& grad_g) {
  check_jacobian_series_backward(op, z, eps, grad_logdet, grad_g);
  JacobianSeriesBackwardOperands o{z.contiguous(), eps.contiguous(), grad_logdet.to(eps.scalar_type()).contiguous(),
                                   grad_g.contiguous(), at::Tensor(), eps.size(0), eps.size(1)};
  o.seed = at::empty(z.sizes(), z.options());
  return o;
}

inline void check_normalize_lists(const char* op, at::TensorList weights, at::TensorList us, at::TensorList vs,
                                  size_t coeffs) {
  const size_t n = weights.size();
  TORCH_CHECK(us.size() == n && vs.size() == n && coeffs == n, op,
              ": expected us, vs and coeffs to have one entry per weight (", n, "), but got ", us.size(), ", ",
              vs.size(), " and ", coeffs);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    check_matrix(op, "weights[i]", w);
    check_same_dtype(op, "weights[i]", w, "weights[0]", weights[0]);
    check_same_device(op, "weights[i]", w, "weights[0]", weights[0]);
    TORCH_CHECK(us[i].dim() == 1 && us[i].size(0) == w.size(0) && vs[i].dim() == 1 && vs[i].size(0) == w.size(1),
                op, ": expected us[", i, "] of shape [", w.size(0), "] and vs[", i, "] of shape [", w.size(1),
                "] for weights[", i, "] of shape ", w.sizes(), ", but got ", us[i].sizes(), " and ", vs[i].sizes());
    check_same_dtype(op, "us[i]", us[i], "weights[i]", w);
    check_same_dtype(op, "vs[i]", vs[i], "weights[i]", w);
    check_same_device(op, "us[i]", us[i], "weights[i]", w);
    check_same_device(op, "vs[i]", vs[i], "weights[i]", w);
  }
}

inline void check_normalize_backward(const char* op, at::TensorList grads, at::TensorList weights, at::TensorList us,
                                     at::TensorList vs, const at::Tensor& sigmas, size_t coeffs, size_t detach) {
  check_normalize_lists(op, weights, us, vs, coeffs);
  const size_t n = weights.size();
  TORCH_CHECK(grads.size() == n && detach == n, op, ": expected grads and detach_sigma to have one entry per weight (",
              n, "), but got ", grads.size(), " and ", detach);
  TORCH_CHECK(sigmas.dim() == 1 && sigmas.size(0) == static_cast<int64_t>(n), op, ": expected sigmas of shape [", n,
              "], but got ", sigmas.sizes());
  for (size_t i = 0; i < n; ++i) {
    check_matches(op, "grads[i]", grads[i], "weights[i]", weights[i]);
  }
  if (n > 0) {  // the weights share one dtype and device (check_normalize_lists)
    check_same_dtype(op, "sigmas", sigmas, "weights[0]", weights[0]);
    check_same_device(op, "sigmas", sigmas, "weights[0]", weights[0]);
  }
}

// The outputs of lipschitz_normalize_: out[i] like weights[i] (contiguous), sigmas (n,) and scales[i] (one
// element each), of the weights' dtype and device.
inline void check_normalize_outputs(const char* op, at::TensorList weights, at::TensorList out, const at::Tensor& sigmas,
                                    at::TensorList scales) {
  const size_t n = weights.size();
  TORCH_CHECK(out.size() == n && scales.size() == n, op, ": expected out and scales to have one entry per weight (",
              n, "), but got ", out.size(), " and ", scales.size());
  TORCH_CHECK(sigmas.dim() == 1 && sigmas.size(0) == static_cast<int64_t>(n) && sigmas.is_contiguous(), op,
              ": expected sigmas to be a contiguous tensor of shape [", n, "], but got ", sigmas.sizes());
  for (size_t i = 0; i < n; ++i) {
    check_matches(op, "out[i]", out[i], "weights[i]", weights[i]);
    TORCH_CHECK(out[i].is_contiguous(), op, ": expected out[", i, "] to be contiguous");
    check_tensor_and_param(op, "weights[i]", weights[i], "scales[i]", scales[i]);
  }
  if (n > 0) {  // the weights share one dtype and device (check_normalize_lists)
    check_same_dtype(op, "sigmas", sigmas, "weights[0]", weights[0]);
    check_same_device(op, "sigmas", sigmas, "weights[0]", weights[0]);
  }
}

}  // namespace resflow_cuda
