// The tensor side of the power-iteration CUDA ops, written once for the CUDA backend
// (power_iteration_cuda.cu) and the emulated test backend (tests/emulated); see
// lipswish_binding.h for the Backend contract, plus max_shared_bytes() and convolutions() (the
// conv operator's convolutions: cuDNN without TF32 on a GPU).
//  - dense: the single-launch kernel of power_iteration_kernels.cuh when u, v and the raw product
//    fit in shared memory and W is small or the batch fills the GPU (plan_power_iteration), else
//    the operator with ATen (mv) and the grid-wide dual-map kernels;
//  - convolution: ATen convolutions and the grid-wide dual-map kernels.
// Neither synchronises with the host per iteration.
#pragma once

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "host/power_iteration_host.h"
#include "power_iteration_kernels.cuh"

namespace resflow_cuda::cuda {

// Every this many iterations the host reads the device's "done" flag to leave early.
constexpr int64_t kDeviceCheckInterval = 16;

// Per-vector workspace of the grid-wide dual map: stats partials and per-block step changes.
template <typename acc_t>
struct VectorWorkspace {
  at::Tensor value, index, power_sum, change_sq, change_max;
  VectorStats<acc_t> stats() {
    return {value.mutable_data_ptr<acc_t>(), index.mutable_data_ptr<int64_t>(), power_sum.mutable_data_ptr<acc_t>(),
            static_cast<int>(value.numel())};
  }
  StepChanges<acc_t> changes(int64_t len) const {
    return {change_sq.const_data_ptr<acc_t>(), change_max.const_data_ptr<acc_t>(), static_cast<int>(value.numel()),
            len};
  }
};

template <typename acc_t, class Backend>
VectorWorkspace<acc_t> vector_workspace(const Backend& backend, const at::Tensor& x) {
  const int64_t blocks = plan_elementwise<acc_t>(x.numel(), backend.sm_count(x), false).blocks;
  const auto opts = x.options();
  return {at::empty({blocks}, opts), at::empty({blocks}, opts.dtype(at::kLong)), at::empty({blocks}, opts),
          at::empty({blocks}, opts), at::empty({blocks}, opts)};
}

// The power iteration of an operator applied with ATen (convolutions, matrices too large for the
// single-launch kernel): the dual maps and the stopping test run in kernels, a device flag
// freezes u and v once the test has passed, and the host reads the flag every
// kDeviceCheckInterval iterations only. u, v arrive in the compute dtype.
template <class Backend>
PowerIterationResult power_iteration_on_device(const Backend& backend, const LinearOperator& op, const at::Tensor& u0,
                                               const at::Tensor& v0, const PowerIterationOptions& opt) {
  // cuBLAS would run the dense operator's float32 products in TF32 under a user's global
  // allow_tf32 (thread-local guard; the convolutions turn TF32 off themselves).
  const at::NoTF32Guard no_tf32;
  at::Tensor u = u0.clone(at::MemoryFormat::Contiguous);
  at::Tensor v = v0.clone(at::MemoryFormat::Contiguous);
  at::Tensor done = at::zeros({}, u.options().dtype(at::kBool));
  at::Tensor iterations = at::zeros({}, u.options().dtype(at::kLong));
  at::Tensor last;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "power_iteration_on_device", [&] {
    using acc_t = scalar_t;
    auto uw = vector_workspace<acc_t>(backend, u);
    auto vw = vector_workspace<acc_t>(backend, v);
    const auto u_map = math::codomain_dual_map<acc_t>(opt.codomain);
    const auto v_map = math::domain_dual_map<acc_t>(opt.domain);
    const auto update = [&](const at::Tensor& raw_in, at::Tensor& x, VectorWorkspace<acc_t>& w,
                            const math::DualMap<acc_t>& map) {
      const at::Tensor raw = raw_in.contiguous();
      launch_dual_map<acc_t>(raw.const_data_ptr<acc_t>(), x.mutable_data_ptr<acc_t>(), x.numel(), map, w.stats(),
                             done.const_data_ptr<bool>(), w.change_sq.template mutable_data_ptr<acc_t>(),
                             w.change_max.template mutable_data_ptr<acc_t>(), backend.stream());
      backend.check_launch();
    };
    for (int64_t it = 0; it < opt.max_iterations; ++it) {
      // Once frozen, u and v stay put and `last` is recomputed from them: it stays A^T u (or A v).
      if (opt.u_first) {
        update(op.matvec(v), u, uw, u_map);
        last = op.rmatvec(u);
        update(last, v, vw, v_map);
      } else {
        update(op.rmatvec(u), v, vw, v_map);
        last = op.matvec(v);
        update(last, u, uw, u_map);
      }
      launch_convergence<acc_t>(uw.changes(u.numel()), vw.changes(v.numel()), opt.tolerance(),
                                static_cast<acc_t>(opt.atol.value_or(0)), static_cast<acc_t>(opt.rtol.value_or(0)),
                                done.mutable_data_ptr<bool>(), iterations.mutable_data_ptr<int64_t>(),
                                backend.stream());
      backend.check_launch();
      if (opt.tolerance() && (it + 1) % kDeviceCheckInterval == 0 && done.item<bool>()) {
        break;
      }
    }
  });
  const at::Tensor sigma = power_iteration_sigma(op, u, v, last, opt.u_first);
  return {u, v, sigma, iterations};
}

template <class Backend>
PowerIterationResult power_iteration_on(const Backend& backend, const at::Tensor& weight_in, const at::Tensor& u_in,
                                        const at::Tensor& v_in, int64_t max_iterations, c10::optional<double> atol,
                                        c10::optional<double> rtol, double domain, double codomain, bool u_first) {
  constexpr const char* op = "resflow_cuda.power_iteration";
  check_dense_power_iteration(op, weight_in, u_in, v_in);
  const auto opt = power_iteration_options(op, max_iterations, atol, rtol, domain, codomain, u_first);
  if (at::isReducedFloatingType(weight_in.scalar_type())) {
    // Half types compute in float32 anyway: converting first keeps one kernel per compute type (a
    // half instantiation spilled registers around the division and sqrt slow paths).
    return power_iteration_in_compute_type(weight_in, u_in, v_in, [&](const at::Tensor& w, const at::Tensor& u0,
                                                                      const at::Tensor& v0) {
      return power_iteration_on(backend, w, u0, v0, max_iterations, atol, rtol, domain, codomain, u_first);
    });
  }
  const auto guard = backend.guard(weight_in);
  const bool batched = weight_in.dim() == 3;
  const at::Tensor weight = batched ? weight_in.contiguous() : weight_in.unsqueeze(0).contiguous();
  const at::Tensor u = batched ? u_in.contiguous() : u_in.unsqueeze(0).contiguous();
  const at::Tensor v = batched ? v_in.contiguous() : v_in.unsqueeze(0).contiguous();
  const int64_t count = weight.size(0), m = weight.size(1), n = weight.size(2);
  PowerIterationResult result;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "power_iteration_cuda", [&] {
    using acc_t = scalar_t;
    const auto plan = plan_power_iteration<scalar_t, acc_t>(count, m, n, backend.max_shared_bytes(),
                                                            backend.sm_count(weight));
    if (!plan.fits || m == 0 || n == 0) {
      result = per_matrix(weight_in, u_in, v_in, [&](const LinearOperator& op, const at::Tensor& ub,
                                                     const at::Tensor& vb) {
        return power_iteration_on_device(backend, op, ub, vb, opt);
      });
      return;
    }
    at::Tensor u_out = at::empty_like(u);
    at::Tensor v_out = at::empty_like(v);
    at::Tensor sigma = at::empty({count}, weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    at::Tensor iterations = at::empty({count}, weight.options().dtype(at::kLong));
    PowerIterationArgs<acc_t> args{static_cast<int>(m), static_cast<int>(n), static_cast<int>(max_iterations),
                                   opt.tolerance(), static_cast<acc_t>(opt.atol.value_or(0)),
                                   static_cast<acc_t>(opt.rtol.value_or(0)), math::codomain_dual_map<acc_t>(codomain),
                                   math::domain_dual_map<acc_t>(domain), u_first};
    launch_power_iteration<scalar_t, acc_t>(plan, weight.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                                            v.const_data_ptr<scalar_t>(), u_out.mutable_data_ptr<scalar_t>(),
                                            v_out.mutable_data_ptr<scalar_t>(), sigma.mutable_data_ptr<acc_t>(),
                                            iterations.mutable_data_ptr<int64_t>(), args, backend.stream());
    backend.check_launch();
    result = batched ? PowerIterationResult{u_out, v_out, sigma, iterations}
                     : PowerIterationResult{u_out[0], v_out[0], sigma[0], iterations[0]};
  });
  return result;
}

template <class Backend>
void power_iteration_update_on(const Backend& backend, at::TensorList weights, at::TensorList us, at::TensorList vs,
                               at::TensorList sigmas, int64_t max_iterations, c10::optional<double> atol,
                               c10::optional<double> rtol, double domain, double codomain, bool u_first) {
  check_power_iteration_update("resflow_cuda.power_iteration_update_", weights, us, vs, sigmas);
  update_in_place(weights, us, vs, sigmas, [&](const at::Tensor& w, const at::Tensor& u, const at::Tensor& v) {
    return power_iteration_on(backend, w, u, v, max_iterations, atol, rtol, domain, codomain, u_first);
  });
}

template <class Backend>
PowerIterationResult conv_power_iteration_on(const Backend& backend, const at::Tensor& weight, const at::Tensor& u,
                                             const at::Tensor& v, at::IntArrayRef input_size, at::IntArrayRef stride,
                                             at::IntArrayRef padding, int64_t max_iterations,
                                             c10::optional<double> atol, c10::optional<double> rtol, double domain,
                                             double codomain, bool u_first) {
  constexpr const char* op = "resflow_cuda.conv_power_iteration";
  const ConvGeometry g = check_conv_power_iteration(op, weight, u, v, input_size, stride, padding);
  const auto opt = power_iteration_options(op, max_iterations, atol, rtol, domain, codomain, u_first);
  const auto guard = backend.guard(weight);
  return power_iteration_in_compute_type(weight, u, v, [&](const at::Tensor& w, const at::Tensor& u0,
                                                           const at::Tensor& v0) {
    return power_iteration_on_device(backend, conv_operator(w, g, backend.convolutions()), u0, v0, opt);
  });
}

}  // namespace resflow_cuda::cuda
