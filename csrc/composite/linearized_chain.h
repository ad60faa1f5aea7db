// The linearization of a residual branch g built from this library's layers, as the log-det ops
// see it: steps i = 1..L, each an optional activation followed by a linear map,
//   a_i = phi_i(h_{i-1}),  h_i = W_i a_i + b_i   (dense: (B, in) -> (B, out); or a k x k convolution),
// with h_0 = x and g = h_L. At a fixed x the Jacobian is J = W_L D_L ... W_1 D_1 with
// D_i = diag(phi_i'(h_{i-1})), so a vector-Jacobian product is a chain of transposed maps and
// elementwise products, run here with ATen (matmul / conv_transpose2d) on any device.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <vector>

#include "checks/tensor_checks.h"

namespace resflow_cuda {

// Activation codes of the ops' `activations` argument (resflow_cuda/linearize.py uses the same).
enum class ActivationKind : int64_t { kIdentity = 0, kLipSwish = 1, kElu = 2, kSoftplus = 3 };

struct ChainStep {
  at::Tensor weight;  // (out, in) dense or (out, in, kh, kw) convolution
  bool conv = false;
  std::array<int64_t, 2> stride{1, 1};
  std::array<int64_t, 2> padding{0, 0};
  std::array<int64_t, 2> output_padding{0, 0};  // makes conv_transpose2d give back the input size
  std::vector<int64_t> input_shape;             // (B, in) or (B, C, H, W)
  std::vector<int64_t> output_shape;
  // For stride-1 convolutions that narrow the channels: the transposed map as a convolution with
  // the flipped kernel, which oneDNN runs several times faster than conv_transpose2d when the
  // transposed map widens few channels to many (e.g. 3 -> 128 at 16x16).
  at::Tensor flipped;

  // w (B, out...) -> w^T W: (B, in...).
  at::Tensor vjp(const at::Tensor& w) const {
    if (!conv) {
      return at::mm(w, weight);
    }
    if (flipped.defined()) {
      return at::conv2d(w, flipped, {}, 1, {weight.size(2) - 1 - padding[0], weight.size(3) - 1 - padding[1]});
    }
    return at::conv_transpose2d(w, weight, {}, stride, padding, output_padding);
  }

  // u (B, in...) -> W u: (B, out...), without bias.
  at::Tensor jvp(const at::Tensor& u) const {
    if (!conv) {
      return at::mm(u, weight.t());
    }
    return at::conv2d(u, weight, {}, stride, padding);
  }

  // The gradient of sum_b <grad_out_b, W input_b> with respect to W.
  at::Tensor weight_grad(const at::Tensor& grad_out, const at::Tensor& input) const {
    if (!conv) {
      return at::mm(grad_out.t(), input);
    }
    const auto grads = at::convolution_backward(grad_out, input, weight, std::nullopt, stride, padding, {1, 1},
                                                false, {0, 0}, 1, {false, true, false});
    return std::get<1>(grads);
  }
};

// Validates the chain described by the op arguments against the input (eps: the shape of x) and
// works out every step's shapes. strides / paddings hold two entries per step (ignored for dense
// steps); derivs[i], when given, is phi_i'(h_{i-1}) and must have step i's input shape.
inline std::vector<ChainStep> make_chain(const char* op, const at::Tensor& eps, at::TensorList weights,
                                         at::IntArrayRef strides, at::IntArrayRef paddings,
                                         const c10::List<std::optional<at::Tensor>>& derivs) {
  check_float_tensor(op, "eps", eps);
  TORCH_CHECK(eps.dim() >= 1, op, ": expected eps to have a batch dimension, but got a 0-dimensional tensor");
  const auto steps = static_cast<int64_t>(weights.size());
  TORCH_CHECK(steps >= 1, op, ": expected at least one weight, but got none");
  TORCH_CHECK(static_cast<int64_t>(strides.size()) == 2 * steps, op, ": expected strides to have 2 entries per "
              "weight (", 2 * steps, "), but got ", strides.size());
  TORCH_CHECK(static_cast<int64_t>(paddings.size()) == 2 * steps, op, ": expected paddings to have 2 entries per "
              "weight (", 2 * steps, "), but got ", paddings.size());
  TORCH_CHECK(static_cast<int64_t>(derivs.size()) == steps, op, ": expected one entry of derivs per weight (",
              steps, "), but got ", derivs.size());
  std::vector<ChainStep> chain(steps);
  std::vector<int64_t> shape = eps.sizes().vec();
  for (int64_t i = 0; i < steps; ++i) {
    ChainStep& step = chain[i];
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.scalar_type() == eps.scalar_type(), op, ": expected weights[", i, "] to have the dtype of eps (",
                eps.scalar_type(), "), but got ", w.scalar_type());
    TORCH_CHECK(w.device() == eps.device(), op, ": expected weights[", i, "] to be on the device of eps (",
                eps.device(), "), but got ", w.device());
    TORCH_CHECK(w.dim() == 2 || w.dim() == 4, op, ": expected weights[", i,
                "] to be a dense (out, in) or convolution (out, in, kh, kw) weight, but got shape ", w.sizes());
    step.weight = w;
    step.conv = w.dim() == 4;
    step.input_shape = shape;
    const int64_t rank = step.conv ? 4 : 2;
    TORCH_CHECK(static_cast<int64_t>(shape.size()) == rank && shape[1] == w.size(1), op, ": weights[", i,
                "] of shape ", w.sizes(), " expects an input of shape (B, ", w.size(1), step.conv ? ", H, W)" : ")",
                ", but the chain gives ", at::IntArrayRef(shape));
    if (step.conv) {
      for (int d = 0; d < 2; ++d) {
        step.stride[d] = strides[2 * i + d];
        step.padding[d] = paddings[2 * i + d];
        TORCH_CHECK(step.stride[d] >= 1 && step.padding[d] >= 0, op, ": expected strides >= 1 and paddings >= 0 "
                    "for weights[", i, "], but got stride ", step.stride[d], " and padding ", step.padding[d]);
        const int64_t in = shape[2 + d];
        const int64_t span = in + 2 * step.padding[d] - w.size(2 + d);
        TORCH_CHECK(span >= 0, op, ": weights[", i, "] (kernel ", w.size(2 + d), ", padding ", step.padding[d],
                    ") does not fit the input size ", in);
        const int64_t out = span / step.stride[d] + 1;
        step.output_padding[d] = in - ((out - 1) * step.stride[d] - 2 * step.padding[d] + w.size(2 + d));
        shape[2 + d] = out;
      }
    }
    shape[1] = w.size(0);
    step.output_shape = shape;
    if (step.conv && step.stride == std::array<int64_t, 2>{1, 1} && w.size(0) < w.size(1) &&
        step.padding[0] < w.size(2) && step.padding[1] < w.size(3)) {
      step.flipped = w.flip({2, 3}).transpose(0, 1).contiguous();
    }
    const auto& d = derivs.get(i);
    if (d.has_value() && d->defined()) {
      TORCH_CHECK(d->sizes() == at::IntArrayRef(step.input_shape), op, ": expected derivs[", i,
                  "] to have the input shape of weights[", i, "] ", at::IntArrayRef(step.input_shape), ", but got ",
                  d->sizes());
      TORCH_CHECK(d->scalar_type() == eps.scalar_type() && d->device() == eps.device(), op, ": expected derivs[",
                  i, "] to have the dtype and device of eps (", eps.scalar_type(), ", ", eps.device(), "), but got ",
                  d->scalar_type(), ", ", d->device());
    }
  }
  TORCH_CHECK(at::IntArrayRef(shape) == eps.sizes(), op, ": the chain maps inputs of shape ", eps.sizes(),
              " to ", at::IntArrayRef(shape), "; a residual branch must keep the shape");
  return chain;
}

inline std::optional<at::Tensor> deriv_at(const c10::List<std::optional<at::Tensor>>& derivs, size_t i) {
  auto d = derivs.get(i);
  return d.has_value() && d->defined() ? d : std::nullopt;
}

// w -> w^T J: the transposed chain from the last step to the first; but for the first step's phi'
// (derivs[0], when given), which the caller multiplies by (the series step fuses it into its pass).
inline at::Tensor chain_vjp_but_first_deriv(const std::vector<ChainStep>& chain,
                                            const c10::List<std::optional<at::Tensor>>& derivs, at::Tensor w) {
  for (size_t i = chain.size(); i-- > 0;) {
    w = chain[i].vjp(w);
    if (const auto d = deriv_at(derivs, i); d && i > 0) {
      w.mul_(*d);
    }
  }
  return w;
}

}  // namespace resflow_cuda
