// dense_jacobian_forward / dense_jacobian_backward: a dense residual branch g(x) of steps "LipSwish (or
// nothing), then W a + b" with its log-det power series and the Neumann surrogate, in forward mode.
//
// Forward: one stack of S = 2 + D blocks of the batch's rows runs through the branch, the primal rows
// (x), the tangents along the probe eps and along every input direction e_d; each step is one matrix
// product of the whole stack and one fused activation kernel (jacobian_lipswish). The last stack holds
// g and the Jacobians J (B, D, D), from which jacobian_series takes every term of the series, the
// Neumann vector w~ and the surrogate s = <w~^T J, eps> in one kernel.
//
// Backward: from the co-tangents of the last stack's first blocks (the seed), back through those blocks of
// every stack: per step the co-tangents give the weight's gradient (one product), the bias' (one sum), the
// input's (one product) and the step's activation backward (jacobian_lipswish_backward). For the Neumann
// surrogate (w~ held constant) the seed is [grad_g; grad_value w~] on the primal rows and the eps tangent;
// for the basic estimator jacobian_series_backward seeds all of them (dL/dJ on the Jacobian's blocks).
// Exact for any upstream gradient. What the forward keeps for it is what its seed covers: for the Neumann
// surrogate per step h, the eps tangent's pre-activation and the first two activated blocks (4 B rows of
// the step's width; 3 for a step without activation), for the basic estimator the whole stacks (2 S + 1
// blocks).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks/dense_jacobian_checks.h"
#include "op_calls.h"

namespace resflow_cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jacobian_lipswish(const at::Tensor& z,
                                                                             const std::optional<at::Tensor>& bias,
                                                                             const at::Tensor& beta, int64_t batch,
                                                                             bool keep) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resflow_cuda::jacobian_lipswish", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, int64_t, bool)>();
  return op.call(z, bias, beta, batch, keep);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jacobian_series(const at::Tensor& z,
                                                                           const std::optional<at::Tensor>& bias,
                                                                           const at::Tensor& eps,
                                                                           at::ArrayRef<double> logdet_coeffs,
                                                                           at::ArrayRef<double> neumann_coeffs) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resflow_cuda::jacobian_series", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, at::ArrayRef<double>,
              at::ArrayRef<double>)>();
  return op.call(z, bias, eps, logdet_coeffs, neumann_coeffs);
}

std::optional<at::Tensor> given(const c10::List<std::optional<at::Tensor>>& list, size_t i) {
  auto t = list.get(i);
  return t.has_value() && t->defined() ? t : std::nullopt;
}

void check_steps(const char* op, const at::Tensor& ref, at::TensorList weights,
                 const c10::List<std::optional<at::Tensor>>& biases, const c10::List<std::optional<at::Tensor>>& betas) {
  const size_t steps = weights.size();
  TORCH_CHECK(steps >= 1, op, ": expected at least one weight, but got none");
  TORCH_CHECK(biases.size() == steps && betas.size() == steps, op, ": expected biases and betas to have one entry ",
              "per weight (", steps, "), but got ", biases.size(), " and ", betas.size());
  int64_t width = ref.size(1);
  for (size_t i = 0; i < steps; ++i) {
    const at::Tensor& w = weights[i];
    check_matrix(op, "weights[i]", w);
    check_same_dtype(op, "weights[i]", w, "x", ref);
    check_same_device(op, "weights[i]", w, "x", ref);
    TORCH_CHECK(w.size(1) == width, op, ": weights[", i, "] of shape ", w.sizes(), " expects ", w.size(1),
                " inputs, but the branch gives ", width);
    width = w.size(0);
    check_bias(op, given(biases, i), width, ref, "x");
    if (const auto beta = given(betas, i)) {
      check_tensor_and_param(op, "x", ref, "betas[i]", *beta);
    }
  }
  TORCH_CHECK(width == ref.size(1), op, ": the branch maps ", ref.size(1), " inputs to ", width,
              "; a residual branch must keep the shape");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
dense_jacobian_forward(const at::Tensor& x, const at::Tensor& eps, at::TensorList weights,
                       const c10::List<std::optional<at::Tensor>>& biases,
                       const c10::List<std::optional<at::Tensor>>& betas, at::ArrayRef<double> logdet_coeffs,
                       at::ArrayRef<double> neumann_coeffs) {
  constexpr const char* op = "resflow_cuda.dense_jacobian_forward";
  check_matrix(op, "x", x);
  check_matches(op, "eps", eps, "x", x);
  check_steps(op, x, weights, biases, betas);
  const int64_t batch = x.size(0);
  const int64_t dim = x.size(1);
  const size_t steps = weights.size();
  // [x; eps; e_1 ... e_D], each block B rows.
  const at::Tensor basis = at::eye(dim, x.options()).unsqueeze(1).expand({dim, batch, dim});
  at::Tensor z = at::cat({x.unsqueeze(0), eps.unsqueeze(0), basis}, 0).view({(2 + dim) * batch, dim});
  // Kept per step for the backward (whole tensors, not views: the op's outputs alias nothing): h, the input
  // stack z (its second block is the eps tangent t) and the activated stack a (its first two blocks feed the
  // weight's gradient). The Neumann surrogate's backward reads only the primal rows and the eps tangent, so
  // for it the activation kernel writes those rows apart (a's first two blocks, z's second) and the D
  // direction tangents are freed with this op instead of being held until the backward.
  const bool neumann = !neumann_coeffs.empty();
  std::vector<at::Tensor> hs(steps), stacks(steps), activated(steps);
  std::optional<at::Tensor> bias_in;
  for (size_t i = 0; i < steps; ++i) {
    at::Tensor a;
    if (const auto beta = given(betas, i)) {
      auto [h, full, kept_a, kept_t] = jacobian_lipswish(z, bias_in, *beta, batch, neumann);
      hs[i] = h;
      a = full;
      activated[i] = neumann ? kept_a : full;
      stacks[i] = neumann ? kept_t : z;
    } else {
      // No activation: a = z with the bias on the primal rows; the backward reads no tangent of this step.
      // For the Neumann surrogate nothing this op returns is z (every kept row is a copy), so z itself
      // takes the bias.
      a = neumann ? z : z.clone();
      if (bias_in.has_value()) {
        a.narrow(0, 0, batch).add_(*bias_in);
      }
      hs[i] = a.narrow(0, 0, batch).clone();
      activated[i] = neumann ? a.narrow(0, 0, 2 * batch).clone() : a;
      stacks[i] = neumann ? at::empty({0, a.size(1)}, a.options()) : z;
    }
    z = at::mm(a, weights[i].t());
    bias_in = given(biases, i);
  }
  // the last stack (g before the bias, and the Jacobians): the basic estimator's seed reads it
  auto [g, logdet, value, w_tilde] = jacobian_series(z, bias_in, eps, logdet_coeffs, neumann_coeffs);
  stacks.push_back(neumann ? at::empty({0, dim}, x.options()) : z);
  return {g, logdet, value, w_tilde, hs, stacks, activated};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
dense_jacobian_backward(const at::Tensor& seed, at::TensorList weights,
                        const c10::List<std::optional<at::Tensor>>& biases,
                        const c10::List<std::optional<at::Tensor>>& betas, at::TensorList hs, at::TensorList stacks,
                        at::TensorList activated) {
  constexpr const char* op = "resflow_cuda.dense_jacobian_backward";
  const size_t steps = weights.size();
  TORCH_CHECK(steps >= 1 && hs.size() == steps && activated.size() == steps && stacks.size() == steps + 1, op,
              ": expected hs and activated to have one entry per weight (", steps, ") and stacks one more, but got ",
              hs.size(), ", ", activated.size(), " and ", stacks.size());
  check_matrix(op, "hs[0]", hs[0]);
  const int64_t batch = hs[0].size(0);
  check_matrix(op, "seed", seed);
  TORCH_CHECK(batch > 0 && seed.size(0) % batch == 0 && seed.size(0) >= batch, op,
              ": expected seed to have a positive multiple of the batch's ", batch, " rows, but got ", seed.sizes());
  check_steps(op, hs[0], weights, biases, betas);
  const int64_t rows = seed.size(0);
  std::vector<at::Tensor> grad_weights(steps), grad_biases(steps), grad_betas(steps);
  at::Tensor r = seed;  // the co-tangents of the first rows / batch blocks of the stack after step i
  for (size_t i = steps; i-- > 0;) {
    const int64_t width = weights[i].size(1);
    const at::Tensor& a = activated[i];
    TORCH_CHECK(a.dim() == 2 && a.size(0) >= rows && a.size(1) == width, op, ": expected activated[", i,
                "] to have at least ", rows, " rows of ", width, ", but got shape ", a.sizes());
    grad_weights[i] = at::mm(r.t(), a.narrow(0, 0, rows));
    grad_biases[i] = given(biases, i) ? r.narrow(0, 0, batch).sum(0) : at::empty({0}, seed.options());
    at::Tensor p = at::mm(r, weights[i]);
    if (const auto beta = given(betas, i)) {
      // the tangent pre-activations the seed covers: rows [B, rows) of the whole stack, or those rows alone
      const at::Tensor& s = stacks[i];
      TORCH_CHECK(s.dim() == 2 && (s.size(0) >= rows || s.size(0) == rows - batch) && s.size(1) == width, op,
                  ": expected stacks[", i, "] to have at least ", rows, " rows (the whole stack) or exactly ",
                  rows - batch, " (its tangent rows) of ", width, ", but got shape ", s.sizes());
      const at::Tensor tangent = s.size(0) >= rows ? s.narrow(0, batch, rows - batch) : s;
      std::tie(r, grad_betas[i]) = jacobian_lipswish_backward(p, hs[i], tangent, *beta);
    } else {
      r = p;
      grad_betas[i] = at::empty({0}, seed.options());
    }
  }
  return {r.narrow(0, 0, batch), grad_weights, grad_biases, grad_betas};
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CompositeExplicitAutograd, m) {
  m.impl("dense_jacobian_forward", &dense_jacobian_forward);
  m.impl("dense_jacobian_backward", &dense_jacobian_backward);
}

}  // namespace resflow_cuda
