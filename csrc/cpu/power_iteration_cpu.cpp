// Power iteration for spectral and induced p->q norms, CPU. Dense matrices (one or a batch of
// equal shape): the fused loop of vec/power_iteration_vec.cpp (per CPU capability), equal to the
// reference up to float rounding. Convolution operators: the reference's loop in ATen ops
// (host/power_iteration_host.h), the convolutions dominating its cost: in float64 u and v equal to
// it bit for bit, in float32 (oneDNN called directly, below) up to rounding; sigma up to rounding
// (from the loop's last convolution, one fewer than the reference).
// Contract: weight, u, v of one floating dtype; float16/bfloat16 compute in float32. Returns u and v
// in that dtype, sigma in the compute dtype and the iteration count (int64), per matrix.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mkldnn_convolution.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "host/power_iteration_host.h"
#include "vec/power_iteration_vec.h"

namespace resflow_cuda::cpu {
namespace {

// Dense: the fused kernel of vec/power_iteration_vec.cpp, matrices of a batch in parallel.
PowerIterationResult dense_power_iteration(const at::Tensor& weight, const at::Tensor& u0, const at::Tensor& v0,
                                           const PowerIterationOptions& opt) {
  const bool batched = weight.dim() == 3;
  const at::Tensor w = (batched ? weight : weight.unsqueeze(0)).contiguous();
  at::Tensor u = (batched ? u0 : u0.unsqueeze(0)).clone(at::MemoryFormat::Contiguous);
  at::Tensor v = (batched ? v0 : v0.unsqueeze(0)).clone(at::MemoryFormat::Contiguous);
  const int64_t count = w.size(0), m = w.size(1), n = w.size(2);
  at::Tensor sigma = at::empty({count}, w.options());
  at::Tensor iterations = at::empty({count}, w.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "power_iteration_cpu", [&] {
    const auto kernel = RESFLOW_CPU_PICK(power_iteration_dense_vec<scalar_t>);
    const auto u_map = math::codomain_dual_map<scalar_t>(opt.codomain);
    const auto v_map = math::domain_dual_map<scalar_t>(opt.domain);
    at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
      std::vector<scalar_t> workspace(std::max(m, n));
      for (int64_t b = first; b < last; ++b) {
        const DensePowerIteration<scalar_t> args{
            w.const_data_ptr<scalar_t>() + b * m * n, m, n, u.mutable_data_ptr<scalar_t>() + b * m,
            v.mutable_data_ptr<scalar_t>() + b * n, workspace.data(), opt.max_iterations, opt.tolerance(),
            static_cast<scalar_t>(opt.atol.value_or(0)), static_cast<scalar_t>(opt.rtol.value_or(0)), u_map, v_map,
            opt.u_first};
        iterations.mutable_data_ptr<int64_t>()[b] = kernel(args, sigma.mutable_data_ptr<scalar_t>() + b);
      }
    });
  });
  if (batched) {
    return {u, v, sigma, iterations};
  }
  return {u[0], v[0], sigma[0], iterations[0]};
}

// One matrix or a batch, in the compute dtype; empty matrices keep the reference's behaviour.
PowerIterationResult solve_dense(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                 const PowerIterationOptions& opt) {
  return power_iteration_in_compute_type(weight, u, v, [&](const at::Tensor& w, const at::Tensor& u0,
                                                           const at::Tensor& v0) {
    if (w.numel() == 0) {
      return per_matrix(w, u0, v0, [&](const LinearOperator& op, const at::Tensor& ub, const at::Tensor& vb) {
        return run_power_iteration(op, ub, vb, opt);
      });
    }
    return dense_power_iteration(w, u0, v0, opt);
  });
}

PowerIterationResult power_iteration_cpu(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                         int64_t max_iterations, c10::optional<double> atol,
                                         c10::optional<double> rtol, double domain, double codomain, bool u_first) {
  constexpr const char* op = "resflow_cuda.power_iteration";
  check_dense_power_iteration(op, weight, u, v);
  return solve_dense(weight, u, v, power_iteration_options(op, max_iterations, atol, rtol, domain, codomain, u_first));
}

void power_iteration_update_cpu(at::TensorList weights, at::TensorList us, at::TensorList vs,
                                at::TensorList sigmas, int64_t max_iterations, c10::optional<double> atol,
                                c10::optional<double> rtol, double domain, double codomain, bool u_first) {
  constexpr const char* op = "resflow_cuda.power_iteration_update_";
  check_power_iteration_update(op, weights, us, vs, sigmas);
  const auto opt = power_iteration_options(op, max_iterations, atol, rtol, domain, codomain, u_first);
  update_in_place(weights, us, vs, sigmas, [&](const at::Tensor& w, const at::Tensor& u, const at::Tensor& v) {
    return solve_dense(w, u, v, opt);
  });
}

// ATen's conv2d sends a batch-1 float32 input of at most 20480 elements with a kernel of at most 3x3
// to its unblocked im2col path; for these operators, whose outputs are far wider than such inputs
// (the CIFAR-10 model's 3/12/48 -> 512 channels), oneDNN is faster at 8x8 to 32x32 (the wide
// inputs already go to oneDNN; the README has the measurements), so float32 convolutions call it
// directly. Same results up to float rounding.
bool use_onednn(const at::Tensor& weight) {
  return weight.scalar_type() == at::kFloat && weight.numel() > 0 && at::hasMKLDNN() &&
         at::globalContext().userEnabledMkldnn();
}

Convolutions onednn_convolutions() {
  Convolutions convs = aten_convolutions();
  convs.conv2d = [](const at::Tensor& x, const at::Tensor& kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
    return at::mkldnn_convolution(x, kernel, {}, padding, stride, {1, 1}, 1);
  };
  return convs;
}

PowerIterationResult conv_power_iteration_cpu(
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, at::IntArrayRef input_size,
    at::IntArrayRef stride, at::IntArrayRef padding, int64_t max_iterations, c10::optional<double> atol,
    c10::optional<double> rtol, double domain, double codomain, bool u_first) {
  constexpr const char* op = "resflow_cuda.conv_power_iteration";
  const ConvGeometry g = check_conv_power_iteration(op, weight, u, v, input_size, stride, padding);
  const auto opt = power_iteration_options(op, max_iterations, atol, rtol, domain, codomain, u_first);
  return power_iteration_in_compute_type(weight, u, v, [&](const at::Tensor& w, const at::Tensor& u0, const at::Tensor& v0) {
    const LinearOperator conv = use_onednn(w) ? conv_operator(w.contiguous(), g, onednn_convolutions())
                                              : conv_operator(w, g);
    return run_power_iteration(conv, u0, v0, opt);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CPU, m) {
  m.impl("power_iteration", &power_iteration_cpu);
  m.impl("conv_power_iteration", &conv_power_iteration_cpu);
  m.impl("power_iteration_update_", &power_iteration_update_cpu);
}

}  // namespace resflow_cuda::cpu
