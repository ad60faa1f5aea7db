// Argument checks of moments_, shared by the CPU and CUDA bindings so that both refuse the same
// inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks/tensor_checks.h"

namespace resflow_cuda {

constexpr const char* kMomentsOp = "resflow_cuda.moments_";

// x: any floating tensor (every element counts); mean and mean_square: one element each, of one
// floating dtype (not necessarily x's), on x's device, written in place.
inline void check_moments(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& mean_square) {
  check_float_tensor(kMomentsOp, "x", x);
  check_float_tensor(kMomentsOp, "mean", mean);
  check_float_tensor(kMomentsOp, "mean_square", mean_square);
  TORCH_CHECK(mean.numel() == 1, kMomentsOp, ": expected mean to have one element (a [1] buffer), but got shape ",
              mean.sizes());
  TORCH_CHECK(mean_square.numel() == 1, kMomentsOp,
              ": expected mean_square to have one element (a [1] buffer), but got shape ", mean_square.sizes());
  check_same_dtype(kMomentsOp, "mean_square", mean_square, "mean", mean);
  check_same_device(kMomentsOp, "mean", mean, "x", x);
  check_same_device(kMomentsOp, "mean_square", mean_square, "x", x);
  check_no_overlap(kMomentsOp, {{"mean", -1, &mean}, {"mean_square", -1, &mean_square}}, {{"x", -1, &x}});
}

}  // namespace resflow_cuda
