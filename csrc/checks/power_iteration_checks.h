// Argument checks of the power-iteration ops (power_iteration, conv_power_iteration,
// power_iteration_update_), shared by the CPU and CUDA bindings so that both refuse the same inputs
// with the same messages; they return the validated options and convolution geometry that the host
// loop (host/power_iteration_host.h) and the kernels run with.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "checks/tensor_checks.h"

namespace resflow_cuda {

struct PowerIterationOptions {
  int64_t max_iterations;
  c10::optional<double> atol;
  c10::optional<double> rtol;
  double domain;    // p, the norm on the input (v) side
  double codomain;  // q, the norm on the output (u) side
  bool u_first;     // InducedNorm* order (u then v); SpectralNorm* updates v first
  bool tolerance() const { return atol.has_value() && rtol.has_value(); }
};

inline PowerIterationOptions power_iteration_options(const char* op, int64_t max_iterations,
                                                     c10::optional<double> atol, c10::optional<double> rtol,
                                                     double domain, double codomain, bool u_first) {
  TORCH_CHECK(max_iterations >= 0, op, ": expected max_iterations >= 0, but got ", max_iterations);
  TORCH_CHECK(atol.has_value() == rtol.has_value(), op,
              ": expected atol and rtol to be given together (the tolerance test needs both), but got atol=",
              atol.has_value() ? std::to_string(*atol) : "None", ", rtol=",
              rtol.has_value() ? std::to_string(*rtol) : "None");
  TORCH_CHECK(!atol.has_value() || (*atol >= 0 && *rtol >= 0), op,
              ": expected atol >= 0 and rtol >= 0, but got atol=", *atol, ", rtol=", *rtol);
  TORCH_CHECK(domain >= 1, op, ": expected domain (the input norm p) >= 1, but got ", domain);
  TORCH_CHECK(codomain >= 1, op, ": expected codomain (the output norm q) >= 1, but got ", codomain);
  return PowerIterationOptions{max_iterations, atol, rtol, domain, codomain, u_first};
}

inline void check_vector_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& weight,
                              at::IntArrayRef expected_shape) {
  check_float_tensor(op, name, t);
  check_same_dtype(op, name, t, "weight", weight);
  check_same_device(op, name, t, "weight", weight);
  TORCH_CHECK(t.sizes() == expected_shape, op, ": expected ", name, " to have shape ", expected_shape, ", but got ",
              t.sizes());
}

// weight (out, in) or a batch (B, out, in) of equal-shaped matrices; u (out) / (B, out); v likewise.
inline void check_dense_power_iteration(const char* op, const at::Tensor& weight, const at::Tensor& u,
                                        const at::Tensor& v) {
  check_float_tensor(op, "weight", weight);
  TORCH_CHECK(weight.dim() == 2 || weight.dim() == 3, op,
              ": expected weight of shape (out, in) or (batch, out, in), but got shape ", weight.sizes());
  std::vector<int64_t> u_shape(weight.sizes().begin(), weight.sizes().end() - 1);
  std::vector<int64_t> v_shape(weight.sizes().begin(), weight.sizes().end());
  v_shape.erase(v_shape.end() - 2);
  check_vector_like(op, "u", u, weight, u_shape);
  check_vector_like(op, "v", v, weight, v_shape);
}

// The 1 x C x H x W convolution operator of a (O, C, kh, kw) weight and its output shape.
struct ConvGeometry {
  std::vector<int64_t> input_shape;   // 1, C, H, W
  std::vector<int64_t> output_shape;  // 1, O, Ho, Wo
  std::vector<int64_t> stride, padding;
};

inline ConvGeometry check_conv_power_iteration(const char* op, const at::Tensor& weight, const at::Tensor& u,
                                               const at::Tensor& v, at::IntArrayRef input_size,
                                               at::IntArrayRef stride, at::IntArrayRef padding) {
  check_float_tensor(op, "weight", weight);
  TORCH_CHECK(weight.dim() == 4, op, ": expected weight of shape (out_channels, in_channels, kh, kw), but got shape ",
              weight.sizes());
  TORCH_CHECK(input_size.size() == 2 && input_size[0] > 0 && input_size[1] > 0, op,
              ": expected input_size [H, W] with positive entries, but got ", input_size);
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, op,
              ": expected stride of two positive entries, but got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": expected padding of two entries >= 0, but got ", padding);
  ConvGeometry g;
  g.input_shape = {1, weight.size(1), input_size[0], input_size[1]};
  g.stride = stride.vec();
  g.padding = padding.vec();
  int64_t out_hw[2];
  for (int d = 0; d < 2; ++d) {
    const int64_t span = input_size[d] + 2 * padding[d] - weight.size(2 + d);
    TORCH_CHECK(span >= 0, op, ": the kernel (", weight.size(2), "x", weight.size(3), ") does not fit the padded input ",
                input_size, " with padding ", padding);
    out_hw[d] = span / stride[d] + 1;
    // conv_transpose2d without output_padding must give back the input size.
    TORCH_CHECK((out_hw[d] - 1) * stride[d] - 2 * padding[d] + weight.size(2 + d) == input_size[d], op,
                ": input_size ", input_size, " is not reproduced by the transposed convolution with stride ", stride,
                " (choose a size for which (H + 2*padding - k) is divisible by the stride)");
  }
  g.output_shape = {1, weight.size(0), out_hw[0], out_hw[1]};
  check_vector_like(op, "u", u, weight, {weight.size(0) * out_hw[0] * out_hw[1]});
  check_vector_like(op, "v", v, weight, {weight.size(1) * input_size[0] * input_size[1]});
  return g;
}

// The list form (power_iteration_update_): equal list lengths; each entry a 2-D weight with its
// u, v and a one-element sigma of the weight's dtype and device; no u, v or sigma shares memory
// with a weight or with another u, v or sigma (they are written in place).
inline void check_power_iteration_update(const char* op, at::TensorList weights, at::TensorList us,
                                         at::TensorList vs, at::TensorList sigmas) {
  TORCH_CHECK(us.size() == weights.size() && vs.size() == weights.size() && sigmas.size() == weights.size(), op,
              ": expected as many us, vs and sigmas as weights (", weights.size(), "), but got ", us.size(), ", ",
              vs.size(), " and ", sigmas.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(weights[i].dim() == 2, op, ": expected weights[", i, "] of shape (out, in), but got shape ",
                weights[i].sizes());
    check_dense_power_iteration(op, weights[i], us[i], vs[i]);
    check_float_tensor(op, "sigma", sigmas[i]);
    check_same_device(op, "sigma", sigmas[i], "weight", weights[i]);
    TORCH_CHECK(sigmas[i].numel() == 1, op, ": expected sigmas[", i, "] to have one element, but got shape ",
                sigmas[i].sizes());
  }
  std::vector<NamedTensor> outputs, inputs;
  outputs.reserve(3 * weights.size());
  inputs.reserve(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto index = static_cast<int64_t>(i);
    outputs.push_back({"us", index, &us[i]});
    outputs.push_back({"vs", index, &vs[i]});
    outputs.push_back({"sigmas", index, &sigmas[i]});
    inputs.push_back({"weights", index, &weights[i]});
  }
  check_no_overlap(op, outputs, inputs);
}

}  // namespace resflow_cuda
