// The tensor side of the fused dense block's CUDA kernels: argument checks (shared with the CPU ops),
// layout, outputs, workspace and dtype dispatch, written once for the CUDA backend
// (dense_jacobian_cuda.cu) and the emulated one of the test extension (tests/emulated), which runs
// the same launchers on CPU memory. Kernels: dense_jacobian_kernels.cuh. Contract as the CPU ops
// (csrc/cpu/dense_jacobian_cpu.cpp).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "checks/dense_jacobian_checks.h"
#include "dense_jacobian_kernels.cuh"

namespace resflow_cuda::cuda {

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jacobian_lipswish_on(const Backend& backend,
                                                                                const at::Tensor& z_in,
                                                                                const std::optional<at::Tensor>& bias,
                                                                                const at::Tensor& beta, int64_t batch,
                                                                                bool keep) {
  auto o = jacobian_lipswish_operands("resflow_cuda.jacobian_lipswish", z_in, bias, beta, batch, keep);
  const auto guard = backend.guard(z_in);
  const at::Tensor &z = o.z, &b = o.bias;
  at::Tensor &h = o.h, &a = o.a;
  const int64_t width = o.width, blocks = o.blocks;
  const bool with_bias = b.defined();
  if (batch * width == 0) {
    return {h, a, o.kept_a, o.kept_t};
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "jacobian_lipswish_cuda", [&] {
    launch_jacobian_lipswish<scalar_t>(backend.sm_count(z), z.const_data_ptr<scalar_t>(),
                                       with_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                                       beta.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(),
                                       a.mutable_data_ptr<scalar_t>(),
                                       o.keep ? o.kept_a.mutable_data_ptr<scalar_t>() : nullptr,
                                       o.keep ? o.kept_t.mutable_data_ptr<scalar_t>() : nullptr, batch, width, blocks,
                                       backend.stream());
    backend.check_launch();
  });
  return {h, a, o.kept_a, o.kept_t};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> jacobian_lipswish_backward_on(const Backend& backend, const at::Tensor& grad_in,
                                                                 const at::Tensor& h_in, const at::Tensor& t_in,
                                                                 const at::Tensor& beta) {
  auto o = jacobian_lipswish_backward_operands("resflow_cuda.jacobian_lipswish_backward", grad_in, h_in, t_in, beta);
  const auto guard = backend.guard(h_in);
  const at::Tensor &grad = o.grad, &h = o.h, &t = o.tangent;
  at::Tensor& out = o.out;
  at::Tensor grad_beta = at::empty(beta.sizes(), beta.options());
  const int64_t n = h.numel();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "jacobian_lipswish_backward_cuda", [&] {
    const int sms = backend.sm_count(h);
    at::Tensor block_sums = at::empty({jacobian_backward_blocks(n, sms)}, h.options().dtype(at::kDouble));
    launch_jacobian_lipswish_backward<scalar_t>(sms, grad.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                                t.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
                                                out.mutable_data_ptr<scalar_t>(), block_sums.mutable_data_ptr<double>(),
                                                grad_beta.mutable_data_ptr<scalar_t>(), n, n == 0 ? 0 : t.numel() / n,
                                                backend.stream());
    backend.check_launch();
  });
  return {out, grad_beta};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jacobian_series_on(
    const Backend& backend, const at::Tensor& z_in, const std::optional<at::Tensor>& bias, const at::Tensor& eps_in,
    at::ArrayRef<double> logdet_coeffs, at::ArrayRef<double> neumann_coeffs) {
  auto o = jacobian_series_operands("resflow_cuda.jacobian_series", z_in, bias, eps_in, logdet_coeffs.size(),
                                    neumann_coeffs.size());
  const auto guard = backend.guard(eps_in);
  const at::Tensor &z = o.z, &eps = o.eps, &b = o.bias;
  at::Tensor &g = o.g, &logdet = o.logdet, &value = o.value, &w_tilde = o.w_tilde;
  const int64_t batch = o.batch, dim = o.dim;
  const bool neumann = o.neumann, with_bias = b.defined();
  const auto acc_type = logdet.scalar_type();
  if (batch == 0) {
    return {g, logdet, value, w_tilde};
  }
  at::Tensor state = at::empty({3, batch, dim}, eps.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES(eps.scalar_type(), "jacobian_series_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_jacobian_series<scalar_t, acc_t>(
        backend.sm_count(eps), z.const_data_ptr<scalar_t>(), with_bias ? b.const_data_ptr<scalar_t>() : nullptr,
        eps.const_data_ptr<scalar_t>(), g.mutable_data_ptr<scalar_t>(), logdet.mutable_data_ptr<acc_t>(),
        neumann ? value.mutable_data_ptr<acc_t>() : nullptr, neumann ? w_tilde.mutable_data_ptr<scalar_t>() : nullptr,
        state.mutable_data_ptr<acc_t>(), batch, dim, logdet_coeffs.data(),
        neumann ? neumann_coeffs.data() : nullptr, static_cast<int64_t>(logdet_coeffs.size()), backend.stream());
    backend.check_launch();
  });
  return {g, logdet, value, w_tilde};
}

template <class Backend>
at::Tensor jacobian_series_backward_on(const Backend& backend, const at::Tensor& z_in, const at::Tensor& eps_in,
                                       at::ArrayRef<double> logdet_coeffs, const at::Tensor& grad_logdet_in,
                                       const at::Tensor& grad_g_in) {
  auto o = jacobian_series_backward_operands("resflow_cuda.jacobian_series_backward", z_in, eps_in, grad_logdet_in,
                                             grad_g_in);
  const auto guard = backend.guard(eps_in);
  const at::Tensor &z = o.z, &eps = o.eps, &grad_g = o.grad_g, &grad_logdet = o.grad_logdet;
  at::Tensor& seed = o.seed;
  const int64_t batch = o.batch, dim = o.dim;
  const int64_t terms = static_cast<int64_t>(logdet_coeffs.size());
  if (batch == 0) {
    return seed;
  }
  // The coefficients travel to the device from pinned memory, behind the queued work (no host sync).
  const auto host = at::TensorOptions().dtype(at::kDouble).pinned_memory(eps.is_cuda());
  at::Tensor coeffs = at::empty({std::max<int64_t>(terms, 1)}, host);
  std::copy(logdet_coeffs.begin(), logdet_coeffs.end(), coeffs.mutable_data_ptr<double>());
  coeffs = coeffs.to(eps.device(), /*non_blocking=*/true);
  const auto acc_type = eps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor state = at::empty({(2 * std::max<int64_t>(terms, 1) + 1) * batch * dim}, eps.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES(eps.scalar_type(), "jacobian_series_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_jacobian_series_backward<scalar_t, acc_t>(
        backend.sm_count(eps), z.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>(),
        coeffs.const_data_ptr<double>(), grad_logdet.const_data_ptr<scalar_t>(), grad_g.const_data_ptr<scalar_t>(),
        seed.mutable_data_ptr<scalar_t>(), state.mutable_data_ptr<acc_t>(), batch, dim, terms, backend.stream());
    backend.check_launch();
  });
  return seed;
}

// A layer's job of the normalization kernels; keep holds the contiguous operands until the launch.
template <typename scalar_t>
NormalizeJob<scalar_t> normalize_job(std::vector<at::Tensor>& keep, const at::Tensor& weight, const at::Tensor& u,
                                     const at::Tensor& v, double coeff) {
  NormalizeJob<scalar_t> job{};
  keep.push_back(weight.contiguous());
  job.weight = keep.back().const_data_ptr<scalar_t>();
  keep.push_back(u.contiguous());
  job.u = keep.back().const_data_ptr<scalar_t>();
  keep.push_back(v.contiguous());
  job.v = keep.back().const_data_ptr<scalar_t>();
  job.rows = weight.size(0);
  job.cols = weight.size(1);
  job.coeff = static_cast<scalar_t>(coeff);
  return job;
}

template <class Backend>
void lipschitz_normalize_on(const Backend& backend, at::TensorList weights, at::TensorList us, at::TensorList vs,
                            at::ArrayRef<double> coeffs, at::TensorList out, const at::Tensor& sigmas,
                            at::TensorList scales) {
  constexpr const char* op = "resflow_cuda.lipschitz_normalize_";
  check_normalize_lists(op, weights, us, vs, coeffs.size());
  check_normalize_outputs(op, weights, out, sigmas, scales);
  const size_t n = weights.size();
  if (n == 0) {
    return;
  }
  const auto guard = backend.guard(weights[0]);
  std::vector<at::Tensor> keep;  // contiguous copies alive until the launch
  AT_DISPATCH_FLOATING_TYPES(weights[0].scalar_type(), "lipschitz_normalize_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<NormalizeJob<scalar_t>> jobs(n);
    for (size_t i = 0; i < n; ++i) {
      jobs[i] = normalize_job<scalar_t>(keep, weights[i], us[i], vs[i], coeffs[i]);
      jobs[i].out = out[i].mutable_data_ptr<scalar_t>();
      jobs[i].scale = scales[i].mutable_data_ptr<scalar_t>();
      jobs[i].sigma = sigmas.mutable_data_ptr<scalar_t>() + i;
    }
    launch_lipschitz_normalize<scalar_t, acc_t>(jobs.data(), static_cast<int64_t>(n), false, backend.stream());
    backend.check_launch();
  });
}

template <class Backend>
std::vector<at::Tensor> lipschitz_normalize_backward_on(const Backend& backend, at::TensorList grads,
                                                        at::TensorList weights, at::TensorList us, at::TensorList vs,
                                                        const at::Tensor& sigmas_in, at::ArrayRef<double> coeffs,
                                                        const c10::List<bool>& detach_sigma) {
  check_normalize_backward("resflow_cuda.lipschitz_normalize_backward", grads, weights, us, vs, sigmas_in,
                           coeffs.size(), detach_sigma.size());
  const size_t n = weights.size();
  std::vector<at::Tensor> out(n);
  if (n == 0) {
    return out;
  }
  const auto guard = backend.guard(weights[0]);
  const at::Tensor sigmas = sigmas_in.contiguous();
  std::vector<at::Tensor> keep;
  AT_DISPATCH_FLOATING_TYPES(weights[0].scalar_type(), "lipschitz_normalize_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<NormalizeJob<scalar_t>> jobs(n);
    for (size_t i = 0; i < n; ++i) {
      jobs[i] = normalize_job<scalar_t>(keep, weights[i], us[i], vs[i], coeffs[i]);
      keep.push_back(grads[i].contiguous());
      jobs[i].grad = keep.back().const_data_ptr<scalar_t>();
      out[i] = at::empty(weights[i].sizes(), weights[i].options());
      jobs[i].out = out[i].mutable_data_ptr<scalar_t>();
      jobs[i].sigma = const_cast<scalar_t*>(sigmas.const_data_ptr<scalar_t>()) + i;
      jobs[i].detach_sigma = detach_sigma.get(i);
    }
    launch_lipschitz_normalize<scalar_t, acc_t>(jobs.data(), static_cast<int64_t>(n), true, backend.stream());
    backend.check_launch();
  });
  return out;
}

}  // namespace resflow_cuda::cuda
