// Every schema of the resflow_cuda ops, defined once (TORCH_LIBRARY). Backends register their
// kernels in csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cu; fake kernels and autograd are
// registered in resflow_cuda/ops.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <string>

#include "version.h"

namespace resflow_cuda {
namespace {

// Kernels with a CPU and a CUDA implementation.
constexpr const char* kKernelSchemas[] = {
    // LipSwish y = x·σ(softplus(beta)·x)/1.1 (csrc/include/resflow/lipswish_math.h).
    "lipswish(Tensor x, Tensor beta) -> Tensor",
    "lipswish_with_derivative(Tensor x, Tensor beta) -> (Tensor, Tensor)",
    "lipswish_backward(Tensor grad, Tensor x, Tensor beta) -> (Tensor, Tensor)",
    "lipswish_double_backward(Tensor grad, Tensor gg_x, Tensor gg_beta, Tensor x, Tensor beta) "
    "-> (Tensor, Tensor, Tensor)",
    // Power iteration for spectral / induced p->q norms (csrc/host/power_iteration_host.h): returns
    // (u, v, sigma, iterations); a dense weight (out, in) or batch (B, out, in), or the convolution
    // operator of a (O, C, kh, kw) weight on a 1 x C x H x W input.
    "power_iteration(Tensor weight, Tensor u, Tensor v, int max_iterations, float? atol, float? rtol, "
    "float domain, float codomain, bool u_first) -> (Tensor, Tensor, Tensor, Tensor)",
    "conv_power_iteration(Tensor weight, Tensor u, Tensor v, int[2] input_size, int[2] stride, int[2] padding, "
    "int max_iterations, float? atol, float? rtol, float domain, float codomain, bool u_first) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    // The same for many matrices of any shapes at once, updating u, v and sigma in place (the
    // buffers of a model's layers: update_lipschitz).
    "power_iteration_update_(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, Tensor(c!)[] sigmas, "
    "int max_iterations, float? atol, float? rtol, float domain, float codomain, bool u_first) -> ()",
    // One term of the log-det power series (csrc/include/resflow/series_math.h): per sample
    // logdet += logdet_coeff <w, eps>, and neumann += neumann_coeff w, in place; with scale, w *= scale
    // (in place) first (the last elementwise product of a vector-Jacobian chain).
    "logdet_series_accumulate_(Tensor(c!) w, Tensor eps, Tensor(a!) logdet, Tensor(b!)? neumann, "
    "float logdet_coeff, float neumann_coeff, Tensor? scale=None) -> ()",
    // The batch moments of a block's log-det estimate (csrc/include/resflow/moments_math.h): mean(x) and
    // mean(x²) over every element of x, into one-element buffers, in place (the training statistics).
    "moments_(Tensor x, Tensor(a!) mean, Tensor(b!) mean_square) -> ()",
    // a[i] + b[i]·scale for every pair in one call (csrc/include/resflow/add_scaled_math.h): a backward-in-forward
    // block's parameter gradients, g's share plus the log-det's times the upstream gradient.
    "foreach_add_scaled(Tensor[] a, Tensor[] b, Tensor scale) -> Tensor[]",
    // ActNorm (csrc/include/resflow/actnorm_math.h): y = (x + bias) e^weight per channel and the log-density
    // logp + sign · positions · Σ weight; its backward: the gradients of x, weight and bias.
    "actnorm(Tensor x, Tensor weight, Tensor bias, Tensor? logp, int sign) -> (Tensor, Tensor)",
    "actnorm_backward(Tensor grad_y, Tensor? grad_logp, Tensor x, Tensor weight, Tensor bias, int sign) "
    "-> (Tensor, Tensor, Tensor)",
    // The fused dense block's kernels (csrc/include/resflow/dense_jacobian_math.h): a LipSwish step of a
    // forward-mode Jacobian stack (returns h, a and, with keep, the rows the Neumann backward holds: a's first
    // two blocks and z's second, written apart) and its backward on the primal and eps-tangent rows
    // (returns the co-tangents and beta's gradient); the power series from the last stack (returns g,
    // logdet, the surrogate and w~) and, for the basic estimator, the seed of the backward from the log-det's
    // gradient (grad_g on the primal rows, dL/dJ on the Jacobian's); W / max(1, sigma / coeff) for many layers into `out`, sigma into
    // `sigmas` and `scales`, and its backward.
    "jacobian_lipswish(Tensor z, Tensor? bias, Tensor beta, int batch, bool keep=False) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "jacobian_lipswish_backward(Tensor grad, Tensor h, Tensor tangent, Tensor beta) -> (Tensor, Tensor)",
    "jacobian_series(Tensor z, Tensor? bias, Tensor eps, float[] logdet_coeffs, float[] neumann_coeffs) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "jacobian_series_backward(Tensor z, Tensor eps, float[] logdet_coeffs, Tensor grad_logdet, Tensor grad_g) "
    "-> Tensor",
    "lipschitz_normalize_(Tensor[] weights, Tensor[] us, Tensor[] vs, float[] coeffs, Tensor(a!)[] out, "
    "Tensor(b!) sigmas, Tensor(c!)[] scales) -> ()",
    "lipschitz_normalize_backward(Tensor[] grads, Tensor[] weights, Tensor[] us, Tensor[] vs, Tensor sigmas, "
    "float[] coeffs, bool[] detach_sigma) -> Tensor[]",
};

// Ops composed of ATen calls and the kernels above, one implementation for every device
// (CompositeExplicitAutograd): the log-det series of a linearized residual branch
// (csrc/composite/linearized_chain.h).
constexpr const char* kCompositeSchemas[] = {
    // All n terms: per-sample log-det terms, the Neumann vector and the Neumann surrogate.
    "linearized_logdet_series(Tensor eps, Tensor[] weights, int[] strides, int[] paddings, Tensor?[] derivs, "
    "float[] logdet_coeffs, float[] neumann_coeffs, bool surrogate) -> (Tensor, Tensor, Tensor)",
    // The surrogate <w~^T J, eps> and its gradient w.r.t. x, weights, biases and LipSwish betas.
    "linearized_neumann_gradient(Tensor w_tilde, Tensor eps, Tensor[] weights, int[] strides, int[] paddings, "
    "Tensor?[] derivs, Tensor[] layer_inputs, Tensor?[] act_inputs, int[] activations, float[] act_params, "
    "Tensor?[] betas, bool[] has_bias) -> (Tensor, Tensor, Tensor[], Tensor[], Tensor[])",
    // A dense branch in forward mode (csrc/composite/dense_jacobian_block.cpp): g, the series' log-det,
    // the Neumann surrogate and w~, and what the backward keeps (per step h, the input stack and the
    // activated stack, and the last stack); the backward from the co-tangents `seed` of the last stack's
    // first blocks (g and J eps for the Neumann surrogate; all of them for the basic estimator).
    "dense_jacobian_forward(Tensor x, Tensor eps, Tensor[] weights, Tensor?[] biases, Tensor?[] betas, "
    "float[] logdet_coeffs, float[] neumann_coeffs) -> (Tensor, Tensor, Tensor, Tensor, Tensor[], Tensor[], Tensor[])",
    "dense_jacobian_backward(Tensor seed, Tensor[] weights, Tensor?[] biases, Tensor?[] betas, Tensor[] hs, "
    "Tensor[] stacks, Tensor[] activated) -> (Tensor, Tensor[], Tensor[], Tensor[])",
};

}  // namespace

TORCH_LIBRARY(resflow_cuda, m) {
  for (const char* schema : kKernelSchemas) {
    m.def(schema);
  }
  for (const char* schema : kCompositeSchemas) {
    m.def(schema);
  }
  m.def("cuda_version() -> int", &cuda_version);
}

namespace {
// Ops without a derivative (logdet_series_accumulate_, moments_, foreach_add_scaled, actnorm_backward, the fused
// dense block's): a tensor argument (or a tensor in a list argument) that requires grad under grad mode is
// refused, instead of the graph being dropped silently.
void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const auto first = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& value = (*stack)[first + i];
      bool requires_grad = value.isTensor() && value.toTensor().requires_grad();
      if (value.isTensorList()) {
        for (const at::Tensor& t : value.toTensorList().vec()) {
          requires_grad = requires_grad || (t.defined() && t.requires_grad());
        }
      }
      TORCH_CHECK(!requires_grad, op.schema().name(), " is not differentiable, but its argument ", args[i].name(),
                  " requires grad; call it under torch.no_grad() (the log-det estimators do)");
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}
}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, Autograd, m) {
  m.impl("logdet_series_accumulate_", torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
  m.impl("moments_", torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
  m.impl("foreach_add_scaled", torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
  m.impl("actnorm_backward", torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
  // The fused dense block's ops: the block computes their gradients itself; refused here in C++, so that
  // the block's calls (under no_grad) pay no Python autograd wrapper.
  for (const char* name : {"lipschitz_normalize_", "lipschitz_normalize_backward", "jacobian_lipswish",
                           "jacobian_lipswish_backward", "jacobian_series", "jacobian_series_backward",
                           "dense_jacobian_forward", "dense_jacobian_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
  }
}

#if !defined(RESFLOW_WITH_CUDA)
namespace {
std::string op_name(const char* schema) {
  const std::string s(schema);
  return s.substr(0, s.find('('));
}

// A CPU-only build still takes CUDA tensors, to say how to get the kernels instead of the
// dispatcher's generic "could not run ... with arguments from the 'CUDA' backend".
void cuda_kernel_missing(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), " got a CUDA tensor, but this build of resflow_cuda has no CUDA kernels (",
              no_cuda_reason(), "). Rebuild it with a CUDA build of torch and the CUDA toolkit (nvcc) present: "
              "RESFLOW_CUDA=1 pip install --no-build-isolation -e .  (setting CUDA_HOME if nvcc is not on PATH; "
              "see README, 'Building with CUDA').");
}
}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CUDA, m) {
  for (const char* schema : kKernelSchemas) {
    m.impl(op_name(schema).c_str(), torch::CppFunction::makeFromBoxedFunction<&cuda_kernel_missing>());
  }
}
#endif

}  // namespace resflow_cuda
