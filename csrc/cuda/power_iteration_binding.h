// The tensor side of the power-iteration CUDA ops, written once for the CUDA backend
// (power_iteration_cuda.cu) and the emulated test backend (tests/emulated); see
// lipswish_binding.h for the Backend contract, plus max_shared_bytes() and convolutions() (the
// conv operator's convolutions: cuDNN without TF32 on a GPU).
//  - dense: the single-launch kernel of power_iteration_kernels.cuh when u, v and the raw product
//    fit in shared memory and W is small or the batch fills the GPU (plan_power_iteration), else
//    the operator with ATen (mv) and the grid-wide dual-map kernels;
//  - convolution: ATen convolutions and the grid-wide dual-map kernels.
// Neither synchronises with the host per iteration. Backend also provides flag_poll(flag): an
// object that copies a device bool to the host behind the queued work (request), says whether
// that copy has arrived (pending, arrived), and reads it (value, or wait for it).
#pragma once

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "host/power_iteration_host.h"
#include "power_iteration_kernels.cuh"

namespace resflow_cuda::cuda {

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

// The device's steps of the shared loop (host/power_iteration_host.h) for an operator applied with
// ATen (convolutions, matrices too large for the single-launch kernel): the dual maps and the
// stopping test run in kernels, and a device flag freezes u and v once the test has passed, so
// iterations the host queues after that change nothing (nor the count). The host never waits for
// the flag per iteration: it asks for a copy at iterations 1, 2, 4, 8, ... and reads the answer
// when it has arrived, or, at the next power of two, waits for it while the iterations queued since
// keep the GPU busy. Without a tolerance there is no stopping test and no convergence kernel.
template <typename acc_t, class Backend>
class DeviceSteps {
 public:
  DeviceSteps(const Backend& backend, const at::Tensor& u0, const at::Tensor& v0, const PowerIterationOptions& opt)
      : backend_(backend),
        opt_(opt),
        u_(u0.clone(at::MemoryFormat::Contiguous)),
        v_(v0.clone(at::MemoryFormat::Contiguous)),
        done_(at::zeros({}, u_.options().dtype(at::kBool))),
        count_(at::zeros({}, u_.options().dtype(at::kLong))),
        uw_(vector_workspace<acc_t>(backend, u_)),
        vw_(vector_workspace<acc_t>(backend, v_)),
        u_map_(math::codomain_dual_map<acc_t>(opt.codomain)),
        v_map_(math::domain_dual_map<acc_t>(opt.domain)),
        poll_(backend.flag_poll(done_)) {}

  const at::Tensor& u() const { return u_; }
  const at::Tensor& v() const { return v_; }
  void update_u(const at::Tensor& product) { apply(product, u_, uw_, u_map_); }
  void update_v(const at::Tensor& product) { apply(product, v_, vw_, v_map_); }

  bool end_iteration(int64_t count) {
    if (!opt_.tolerance()) {
      return false;
    }
    launch_convergence<acc_t>(uw_.changes(u_.numel()), vw_.changes(v_.numel()), true,
                              static_cast<acc_t>(*opt_.atol), static_cast<acc_t>(*opt_.rtol),
                              done_.mutable_data_ptr<bool>(), count_.mutable_data_ptr<int64_t>(), backend_.stream());
    backend_.check_launch();
    if (poll_.arrived() && poll_.value()) {
      return true;
    }
    if ((count & (count - 1)) == 0) {  // a power of two
      if (poll_.pending() && poll_.wait()) {
        return true;
      }
      poll_.request();
    }
    return false;
  }

  at::Tensor iterations() const {
    return opt_.tolerance() ? count_ : at::full({}, opt_.max_iterations, u_.options().dtype(at::kLong));
  }

 private:
  void apply(const at::Tensor& product, at::Tensor& x, VectorWorkspace<acc_t>& w, const math::DualMap<acc_t>& map) {
    const at::Tensor raw = product.contiguous();
    launch_dual_map<acc_t>(raw.const_data_ptr<acc_t>(), x.mutable_data_ptr<acc_t>(), x.numel(), map, w.stats(),
                           done_.const_data_ptr<bool>(), w.change_sq.template mutable_data_ptr<acc_t>(),
                           w.change_max.template mutable_data_ptr<acc_t>(), backend_.stream());
    backend_.check_launch();
  }

  const Backend& backend_;
  const PowerIterationOptions& opt_;
  at::Tensor u_, v_, done_, count_;
  VectorWorkspace<acc_t> uw_, vw_;
  math::DualMap<acc_t> u_map_, v_map_;
  decltype(std::declval<const Backend&>().flag_poll(std::declval<const at::Tensor&>())) poll_;
};

// The shared loop with the device's steps; u, v arrive in the compute dtype.
template <class Backend>
PowerIterationResult power_iteration_on_device(const Backend& backend, const LinearOperator& op, const at::Tensor& u0,
                                               const at::Tensor& v0, const PowerIterationOptions& opt) {
  // cuBLAS would run the dense operator's float32 products in TF32 under a user's global
  // allow_tf32 (thread-local guard; the convolutions turn TF32 off themselves).
  const at::NoTF32Guard no_tf32;
  PowerIterationResult result;
  AT_DISPATCH_FLOATING_TYPES(u0.scalar_type(), "power_iteration_on_device", [&] {
    DeviceSteps<scalar_t, Backend> steps(backend, u0, v0, opt);
    result = power_iteration_loop(op, steps, opt);
  });
  return result;
}

template <typename acc_t>
PowerIterationArgs<acc_t> kernel_args(const PowerIterationOptions& opt, int m = 0, int n = 0) {
  return {m, n, math::sqrt_(static_cast<acc_t>(m)), math::sqrt_(static_cast<acc_t>(n)),
          static_cast<int>(opt.max_iterations), opt.tolerance(), static_cast<acc_t>(opt.atol.value_or(0)),
          static_cast<acc_t>(opt.rtol.value_or(0)), math::codomain_dual_map<acc_t>(opt.codomain),
          math::domain_dual_map<acc_t>(opt.domain), opt.u_first};
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
    launch_power_iteration<scalar_t, acc_t>(plan, weight.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                                            v.const_data_ptr<scalar_t>(), u_out.mutable_data_ptr<scalar_t>(),
                                            v_out.mutable_data_ptr<scalar_t>(), sigma.mutable_data_ptr<acc_t>(),
                                            iterations.mutable_data_ptr<int64_t>(),
                                            kernel_args<acc_t>(opt, static_cast<int>(m), static_cast<int>(n)),
                                            backend.stream());
    backend.check_launch();
    result = batched ? PowerIterationResult{u_out, v_out, sigma, iterations}
                     : PowerIterationResult{u_out[0], v_out[0], sigma[0], iterations[0]};
  });
  return result;
}

// The single-block kernel on the listed float32 matrices, kListedJobs per launch, writing each
// one's u, v and sigma where they are. Every entry is contiguous, with a float32 sigma.
template <class Backend>
void update_listed(const Backend& backend, at::TensorList weights, at::TensorList us, at::TensorList vs,
                   at::TensorList sigmas, const std::vector<size_t>& listed, const PowerIterationOptions& opt) {
  for (size_t first = 0; first < listed.size(); first += kListedJobs) {
    ListedJobs<float, float> jobs{};
    size_t shared_bytes = 0;
    const size_t count = std::min(listed.size() - first, static_cast<size_t>(kListedJobs));
    for (size_t j = 0; j < count; ++j) {
      const size_t i = listed[first + j];
      const int m = static_cast<int>(weights[i].size(0)), n = static_cast<int>(weights[i].size(1));
      jobs.jobs[j] = {weights[i].const_data_ptr<float>(),
                      us[i].const_data_ptr<float>(),
                      vs[i].const_data_ptr<float>(),
                      us[i].mutable_data_ptr<float>(),
                      vs[i].mutable_data_ptr<float>(),
                      sigmas[i].mutable_data_ptr<float>(),
                      m,
                      n,
                      math::sqrt_(static_cast<float>(m)),
                      math::sqrt_(static_cast<float>(n))};
      shared_bytes = std::max(shared_bytes,
                              plan_power_iteration<float, float>(1, m, n, backend.max_shared_bytes(), 1).shared_bytes);
    }
    const PowerIterationPlan plan{static_cast<int>(count), kPowerIterationThreads, shared_bytes, true};
    launch_power_iteration_list<float, float>(plan, jobs, kernel_args<float>(opt), backend.stream());
    backend.check_launch();
  }
}

// update_lipschitz's op: the float32 matrices the single-block kernel takes (small enough,
// contiguous u and v, a float32 sigma) go in one launch per device (per kListedJobs matrices),
// writing their layers' buffers directly; the others (float64 and half types too: float64's
// listed kernel would spill registers, and both are rare on GPUs) one at a time through
// power_iteration_on.
template <class Backend>
void power_iteration_update_on(const Backend& backend, at::TensorList weights, at::TensorList us, at::TensorList vs,
                               at::TensorList sigmas, int64_t max_iterations, c10::optional<double> atol,
                               c10::optional<double> rtol, double domain, double codomain, bool u_first) {
  constexpr const char* op = "resflow_cuda.power_iteration_update_";
  check_power_iteration_update(op, weights, us, vs, sigmas);
  const auto opt = power_iteration_options(op, max_iterations, atol, rtol, domain, codomain, u_first);
  std::vector<at::Tensor> contiguous(weights.size());
  std::vector<bool> handled(weights.size(), false);
  const auto listable = [&](size_t i) {
    const at::Tensor& w = weights[i];
    return w.scalar_type() == at::kFloat && w.numel() > 0 && us[i].is_contiguous() && vs[i].is_contiguous() &&
           sigmas[i].scalar_type() == at::kFloat &&
           plan_power_iteration<float, float>(1, w.size(0), w.size(1), backend.max_shared_bytes(), backend.sm_count(w))
               .fits;
  };
  for (size_t first = 0; first < weights.size(); ++first) {
    if (handled[first] || !listable(first)) {
      continue;
    }
    std::vector<size_t> listed;
    for (size_t i = first; i < weights.size(); ++i) {
      if (!handled[i] && weights[i].device() == weights[first].device() && listable(i)) {
        contiguous[i] = weights[i].contiguous();
        listed.push_back(i);
        handled[i] = true;
      }
    }
    const auto guard = backend.guard(weights[first]);
    update_listed(backend, contiguous, us, vs, sigmas, listed, opt);
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    if (!handled[i]) {
      update_in_place(weights.slice(i, 1), us.slice(i, 1), vs.slice(i, 1), sigmas.slice(i, 1),
                      [&](const at::Tensor& w, const at::Tensor& u, const at::Tensor& v) {
                        return power_iteration_on(backend, w, u, v, max_iterations, atol, rtol, domain, codomain,
                                                  u_first);
                      });
    }
  }
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
