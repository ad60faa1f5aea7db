// linearized_logdet_series: all n terms of the log-det power series of a linearized branch
// (csrc/composite/linearized_chain.h) in one call. w_k = w_{k-1}^T J from w_0 = eps; each term goes through
// the fused accumulation op (logdet_series_accumulate_, which also takes the chain's last product, by
// the first step's phi'):
//   logdet   = sum_k logdet_coeffs[k] <w_k, eps>          per sample
//   neumann  = eps + sum_k neumann_coeffs[k] w_k          (when neumann_coeffs is not empty)
//   surrogate = <neumann^T J, eps>                        per sample (when also `surrogate`)
// Device-agnostic (ATen matmul / convolutions + the fused op's CPU or CUDA kernel).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "linearized_chain.h"

namespace resflow_cuda {
namespace {

constexpr const char* kOp = "linearized_logdet_series";

void accumulate(const at::Tensor& w, const at::Tensor& eps, const at::Tensor& logdet,
                const std::optional<at::Tensor>& neumann, double logdet_coeff, double neumann_coeff,
                const std::optional<at::Tensor>& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resflow_cuda::logdet_series_accumulate_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, double, double,
                                         const std::optional<at::Tensor>&)>();
  op.call(w, eps, logdet, neumann, logdet_coeff, neumann_coeff, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linearized_logdet_series(
    const at::Tensor& eps, at::TensorList weights, at::IntArrayRef strides, at::IntArrayRef paddings,
    const c10::List<std::optional<at::Tensor>>& derivs, at::ArrayRef<double> logdet_coeffs,
    at::ArrayRef<double> neumann_coeffs, bool with_surrogate) {
  const auto chain = make_chain(kOp, eps, weights, strides, paddings, derivs);
  const bool with_neumann = !neumann_coeffs.empty();
  TORCH_CHECK(!with_neumann || neumann_coeffs.size() == logdet_coeffs.size(), kOp,
              ": expected neumann_coeffs to be empty or to have one entry per term (", logdet_coeffs.size(),
              "), but got ", neumann_coeffs.size());
  const auto acc_type = eps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = eps.options().dtype(acc_type);
  at::Tensor logdet = at::zeros({eps.size(0)}, acc_options);
  at::Tensor neumann = with_neumann ? eps.clone(at::MemoryFormat::Contiguous) : at::empty({0}, eps.options());
  with_surrogate = with_surrogate && with_neumann;
  at::Tensor surrogate = with_surrogate ? at::zeros({eps.size(0)}, acc_options) : at::empty({0}, acc_options);
  if (eps.numel() == 0) {
    return {logdet, neumann, surrogate};
  }
  const std::optional<at::Tensor> neumann_arg = with_neumann ? std::optional<at::Tensor>(neumann) : std::nullopt;
  // the first step's phi' multiplies each term's vector inside the series step (in place, before it is read)
  const std::optional<at::Tensor> first_deriv = deriv_at(derivs, 0);
  at::Tensor w = eps;
  for (size_t k = 0; k < logdet_coeffs.size(); ++k) {
    w = chain_vjp_but_first_deriv(chain, derivs, w);
    accumulate(w, eps, logdet, neumann_arg, logdet_coeffs[k], with_neumann ? neumann_coeffs[k] : 0.0, first_deriv);
  }
  if (with_surrogate) {
    accumulate(chain_vjp_but_first_deriv(chain, derivs, neumann), eps, surrogate, std::nullopt, 1.0, 0.0,
               first_deriv);
  }
  return {logdet, neumann, surrogate};
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CompositeExplicitAutograd, m) {
  m.impl("linearized_logdet_series", &linearized_logdet_series);
}

}  // namespace resflow_cuda
