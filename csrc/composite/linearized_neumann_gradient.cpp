// linearized_neumann_gradient: the gradient of the Neumann surrogate s = sum_b <w~_b^T J_b, eps_b>
// of a linearized branch (csrc/composite/linearized_chain.h) with respect to x, every weight, bias and
// LipSwish beta, with w~ held constant, from the cached forward quantities: no autograd graph.
//
// With tangents t_0 = eps, u_i = phi_i'(h_{i-1}) t_{i-1}, t_i = W_i u_i, and co-tangents
// r_L = w~, p_i = r_i^T W_i, r_{i-1} = p_i phi_i'(h_{i-1}), s = <r_0, eps> and
//   ds/dW_i (through J)   = sum_b r_i u_i^T
//   ds/dh_{i-1} (through D_i) = p_i t_{i-1} phi_i''(h_{i-1})   (and the beta partials of phi_i')
// which then flows back through the primal network h_i = W_i phi_i(h_{i-1}) + b_i as an ordinary
// gradient G: G_{i-1} = (G_i^T W_i) phi_i' + p_i t_{i-1} phi_i'', ds/dW_i += sum_b G_i a_i^T,
// ds/db_i = sum G_i, ds/dx = G_0. For a LipSwish step (float32 / float64) r_{i-1}, G_{i-1} and beta's
// partials come from one pass of the fused dense block's stack kernel over [G_i^T W_i; p_i] with the
// tangent t_{i-1} (jacobian_lipswish_backward); the half types use its backward / double-backward ops;
// ELU's and softplus' phi'' are below.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "linearized_chain.h"
#include "op_calls.h"

namespace resflow_cuda {
namespace {

constexpr const char* kOp = "linearized_neumann_gradient";

std::tuple<at::Tensor, at::Tensor> lipswish_backward(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& beta) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resflow_cuda::lipswish_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&)>();
  return op.call(grad, x, beta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lipswish_double_backward(const at::Tensor& grad, const at::Tensor& gg_x,
                                                                        const at::Tensor& gg_beta, const at::Tensor& x,
                                                                        const at::Tensor& beta) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resflow_cuda::lipswish_double_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&)>();
  return op.call(grad, gg_x, gg_beta, x, beta);
}

// The dtypes of jacobian_lipswish_backward (the half types take LipSwish's own backward ops).
bool stack_kernel_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// phi''(h): ELU(alpha) is alpha e^h for h <= 0 (0 above); softplus(beta, threshold) is
// beta s (1 - s) with s = sigmoid(beta h) where beta h <= threshold (linear, 0, above).
at::Tensor second_derivative(ActivationKind kind, const at::Tensor& h, double p0, double p1) {
  if (kind == ActivationKind::kElu) {
    return at::where(h > 0, at::zeros_like(h), at::exp(h) * p0);
  }
  const at::Tensor z = h * p0;
  const at::Tensor s = at::sigmoid(z);
  return at::where(z > p1, at::zeros_like(h), s * (1 - s) * p0);
}

at::Tensor sum_except_channels(const at::Tensor& g) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < g.dim(); ++d) {
    dims.push_back(d);
  }
  return g.sum(dims);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
linearized_neumann_gradient(const at::Tensor& w_tilde, const at::Tensor& eps, at::TensorList weights,
                            at::IntArrayRef strides, at::IntArrayRef paddings,
                            const c10::List<std::optional<at::Tensor>>& derivs, at::TensorList layer_inputs,
                            const c10::List<std::optional<at::Tensor>>& act_inputs, at::IntArrayRef activations,
                            at::ArrayRef<double> act_params, const c10::List<std::optional<at::Tensor>>& betas,
                            const c10::List<bool>& has_bias) {
  const auto chain = make_chain(kOp, eps, weights, strides, paddings, derivs);
  const size_t steps = chain.size();
  check_matches(kOp, "w_tilde", w_tilde, "eps", eps);
  TORCH_CHECK(layer_inputs.size() == steps && act_inputs.size() == steps && activations.size() == steps &&
                  betas.size() == steps && has_bias.size() == steps && act_params.size() == 2 * steps,
              kOp, ": expected layer_inputs, act_inputs, activations, betas and has_bias to have one entry per "
              "weight and act_params two (", steps, " weights), but got ", layer_inputs.size(), ", ",
              act_inputs.size(), ", ", activations.size(), ", ", betas.size(), ", ", has_bias.size(), " and ",
              act_params.size());
  std::vector<ActivationKind> kinds(steps);
  for (size_t i = 0; i < steps; ++i) {
    TORCH_CHECK(activations[i] >= 0 && activations[i] <= 3, kOp, ": expected activations[", i,
                "] to be 0 (identity), 1 (LipSwish), 2 (ELU) or 3 (softplus), but got ", activations[i]);
    kinds[i] = static_cast<ActivationKind>(activations[i]);
    const bool act = kinds[i] != ActivationKind::kIdentity;
    TORCH_CHECK(layer_inputs[i].sizes() == at::IntArrayRef(chain[i].input_shape) &&
                    layer_inputs[i].scalar_type() == eps.scalar_type() && layer_inputs[i].device() == eps.device(),
                kOp, ": expected layer_inputs[", i, "] to have the input shape of weights[", i, "] ",
                at::IntArrayRef(chain[i].input_shape), " and the dtype and device of eps, but got ",
                layer_inputs[i].sizes(), " ", layer_inputs[i].scalar_type(), " on ", layer_inputs[i].device());
    TORCH_CHECK(act == deriv_at(derivs, i).has_value() && act == deriv_at(act_inputs, i).has_value(), kOp,
                ": step ", i, " has activation ", activations[i], ", so derivs[", i, "] and act_inputs[", i,
                "] must both be ", act ? "given" : "None");
    TORCH_CHECK((kinds[i] == ActivationKind::kLipSwish) == deriv_at(betas, i).has_value(), kOp, ": expected betas[",
                i, "] to be given exactly for LipSwish steps");
  }

  // Below the first activation from the top the co-tangents are two, G_i and r_i, and every product of a
  // step takes them stacked [G_i; r_i] (2B samples) in one call: the weight's gradient against the stacked
  // inputs [a_i; u_i], the transposed map giving [G_i^T W_i; p_i]. stacked[i]: G_i is not zero.
  std::vector<bool> stacked(steps);
  bool seen = false;
  for (size_t i = steps; i-- > 0;) {
    stacked[i] = seen;
    seen = seen || deriv_at(derivs, i).has_value();
  }
  // Tangents: t_{i-1} entering step i, u_i = phi_i' t_{i-1}; inputs[i] what step i's weight gradient reads.
  std::vector<at::Tensor> tangents(steps), inputs(steps);
  at::Tensor t = eps;
  for (size_t i = 0; i < steps; ++i) {
    tangents[i] = t;
    const auto d = deriv_at(derivs, i);
    const at::Tensor u = d ? t * *d : t;
    inputs[i] = stacked[i] ? at::cat({layer_inputs[i], u}) : u;
    t = chain[i].jvp(u);
  }

  const int64_t batch = eps.size(0);
  std::vector<at::Tensor> grad_weights(steps), grad_biases(steps), grad_betas(steps);
  at::Tensor cot = w_tilde;  // r_i, or [G_i; r_i] where stacked[i]
  for (size_t i = steps; i-- > 0;) {
    const ChainStep& step = chain[i];
    grad_weights[i] = step.weight_grad(cot, inputs[i]);
    grad_biases[i] = !has_bias.get(i) ? at::empty({0}, eps.options())
                     : stacked[i]     ? sum_except_channels(cot.narrow(0, 0, batch))
                                      : at::zeros({step.weight.size(0)}, eps.options());
    const at::Tensor q = step.vjp(cot);  // p_i, or [G_i^T W_i; p_i]
    const auto d = deriv_at(derivs, i);
    if (!d) {
      cot = q;
      grad_betas[i] = at::empty({0}, eps.options());
      continue;
    }
    const at::Tensor h = *deriv_at(act_inputs, i);
    const at::Tensor& tangent = tangents[i];
    const bool lipswish = kinds[i] == ActivationKind::kLipSwish;
    const at::Tensor beta = lipswish ? *deriv_at(betas, i) : at::Tensor();
    if (lipswish && stacked[i] && stack_kernel_dtype(h)) {
      // One pass over [G_i^T W_i; p_i] with the tangent t_{i-1} (the fused block's kernel, rows of the
      // flattened shape): G = (G_i^T W_i) phi' + p t_{i-1} phi'', r = p phi', beta's partials of both.
      const int64_t width = c10::multiply_integers(h.sizes().slice(1));
      auto [out, grad_beta] = jacobian_lipswish_backward(q.reshape({2 * batch, width}), h.reshape({batch, width}),
                                                         tangent.reshape({batch, width}), beta);
      cot = out.view(q.sizes());
      grad_betas[i] = grad_beta;
      continue;
    }
    const at::Tensor p = stacked[i] ? q.narrow(0, batch, batch) : q;
    at::Tensor r, grad;
    if (lipswish) {
      // The double backward with grad = t_{i-1} and gg_x = p (it is symmetric in the two): its gradient
      // of grad is p phi' = r_{i-1}, of h p t_{i-1} phi'', of beta the slope's beta partial; below the top
      // (the half types here) LipSwish's backward adds G_i^T W_i's share.
      std::tie(r, grad, grad_betas[i]) = lipswish_double_backward(tangent, p, at::zeros_like(beta), h, beta);
      if (stacked[i]) {
        auto [through, beta_from_value] = lipswish_backward(q.narrow(0, 0, batch), h, beta);
        grad.add_(through);
        grad_betas[i] = grad_betas[i] + beta_from_value;
      }
    } else {
      r = p * *d;
      grad = p * tangent * second_derivative(kinds[i], h, act_params[2 * i], act_params[2 * i + 1]);
      if (stacked[i]) {
        grad.add_(q.narrow(0, 0, batch) * *d);
      }
      grad_betas[i] = at::empty({0}, eps.options());
    }
    cot = at::cat({grad, r});
  }
  // seen: the last co-tangents are stacked [G_0; r_0] (some step has an activation)
  const at::Tensor r = seen ? cot.narrow(0, batch, batch) : cot;
  const at::Tensor surrogate = (r * eps).reshape({batch, c10::multiply_integers(eps.sizes().slice(1))}).sum(1);
  const at::Tensor grad_x = seen ? cot.narrow(0, 0, batch) : at::zeros_like(eps);
  return {surrogate, grad_x, grad_weights, grad_biases, grad_betas};
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CompositeExplicitAutograd, m) {
  m.impl("linearized_neumann_gradient", &linearized_neumann_gradient);
}

}  // namespace resflow_cuda
