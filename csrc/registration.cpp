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
    // logdet += logdet_coeff <w, eps>, and neumann += neumann_coeff w, in place.
    "logdet_series_accumulate_(Tensor w, Tensor eps, Tensor(a!) logdet, Tensor(b!)? neumann, float logdet_coeff, "
    "float neumann_coeff) -> ()",
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
// In-place ops without a derivative (logdet_series_accumulate_): a tensor argument that requires
// grad under grad mode is refused, instead of the graph being dropped silently.
void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const auto first = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& value = (*stack)[first + i];
      TORCH_CHECK(!(value.isTensor() && value.toTensor().requires_grad()), op.schema().name(), " is not "
                  "differentiable, but its argument ", args[i].name(), " requires grad; call it under "
                  "torch.no_grad() (the log-det estimators do)");
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}
}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, Autograd, m) {
  m.impl("logdet_series_accumulate_", torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
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
