// actnorm and actnorm_backward on the CPU (resflow/actnorm_math.h): the forward y = (x + b) e^w in one pass
// (with the log-density logp + sign · positions · Σ w), and the backward's three gradients in one pass over
// grad_y and x, channel by channel (in parallel over channels); each channel's sums are taken in double in a
// fixed order, so the result does not depend on the number of threads. Checks and layout:
// checks/actnorm_checks.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks/actnorm_checks.h"
#include "resflow/actnorm_math.h"

namespace resflow_cuda::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> actnorm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                               const std::optional<at::Tensor>& logp, int64_t sign) {
  const ActNormOperands ops = actnorm_operands(x, weight, bias, logp, sign);
  TORCH_CHECK(x.device().is_cpu(), kActNormOp, ": expected CPU tensors, but got x on ", x.device());
  const ActNormShape& s = ops.shape;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "actnorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* w = ops.weight.const_data_ptr<scalar_t>();
    const scalar_t* b = ops.bias.const_data_ptr<scalar_t>();
    const scalar_t* px = ops.x.const_data_ptr<scalar_t>();
    scalar_t* py = ops.y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.batch * s.channels, 1, [&](int64_t first, int64_t last) {
      for (int64_t row = first; row < last; ++row) {
        const int64_t c = row % s.channels;
        const acc_t scale = math::actnorm_scale(static_cast<acc_t>(w[c]));
        const acc_t shift = static_cast<acc_t>(b[c]);
        for (int64_t k = row * s.positions; k < (row + 1) * s.positions; ++k) {
          py[k] = static_cast<scalar_t>(math::actnorm_value(static_cast<acc_t>(px[k]), shift, scale));
        }
      }
    });
    if (ops.logp.defined()) {
      acc_t weight_sum = acc_t(0);
      for (int64_t c = 0; c < s.channels; ++c) {
        weight_sum += static_cast<acc_t>(w[c]);
      }
      const auto signed_positions = static_cast<acc_t>(sign * s.positions);
      const scalar_t* pl = ops.logp.const_data_ptr<scalar_t>();
      scalar_t* po = ops.logp_out.mutable_data_ptr<scalar_t>();
      for (int64_t r = 0; r < s.batch; ++r) {
        po[r] = static_cast<scalar_t>(math::actnorm_logp(static_cast<acc_t>(pl[r]), weight_sum, signed_positions));
      }
    }
  });
  return {ops.y, ops.logp_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_backward_cpu(const at::Tensor& grad_y,
                                                                    const std::optional<at::Tensor>& grad_logp,
                                                                    const at::Tensor& x, const at::Tensor& weight,
                                                                    const at::Tensor& bias, int64_t sign) {
  const ActNormBackwardOperands ops = actnorm_backward_operands(grad_y, grad_logp, x, weight, bias, sign);
  TORCH_CHECK(x.device().is_cpu(), kActNormBackwardOp, ": expected CPU tensors, but got x on ", x.device());
  const ActNormShape& s = ops.shape;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "actnorm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* w = ops.weight.const_data_ptr<scalar_t>();
    const scalar_t* b = ops.bias.const_data_ptr<scalar_t>();
    const scalar_t* px = ops.x.const_data_ptr<scalar_t>();
    const scalar_t* pg = ops.grad_y.const_data_ptr<scalar_t>();
    scalar_t* pgx = ops.grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* pgw = ops.grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* pgb = ops.grad_bias.mutable_data_ptr<scalar_t>();
    double logp_sum = 0.0;
    if (ops.grad_logp.defined()) {
      const scalar_t* pl = ops.grad_logp.const_data_ptr<scalar_t>();
      for (int64_t r = 0; r < s.batch; ++r) {
        logp_sum += static_cast<double>(pl[r]);
      }
    }
    const double signed_positions = static_cast<double>(sign * s.positions);
    at::parallel_for(0, s.channels, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const acc_t scale = math::actnorm_scale(static_cast<acc_t>(w[c]));
        const acc_t shift = static_cast<acc_t>(b[c]);
        double sum_g = 0.0, sum_gy = 0.0;
        for (int64_t r = 0; r < s.batch; ++r) {
          const int64_t base = (r * s.channels + c) * s.positions;
          for (int64_t k = base; k < base + s.positions; ++k) {
            const acc_t g = static_cast<acc_t>(pg[k]);
            pgx[k] = static_cast<scalar_t>(g * scale);
            sum_g += static_cast<double>(g);
            sum_gy += static_cast<double>(g) *
                      static_cast<double>(math::actnorm_value(static_cast<acc_t>(px[k]), shift, scale));
          }
        }
        pgb[c] = static_cast<scalar_t>(sum_g * static_cast<double>(scale));
        pgw[c] = static_cast<scalar_t>(sum_gy + signed_positions * logp_sum);
      }
    });
  });
  return {ops.grad_x, ops.grad_weight, ops.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(resflow_cuda, CPU, m) {
  m.impl("actnorm", &actnorm_cpu);
  m.impl("actnorm_backward", &actnorm_backward_cpu);
}

}  // namespace resflow_cuda::cpu
