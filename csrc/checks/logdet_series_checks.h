// Argument checks and operand layout of logdet_series_accumulate_, shared by the CPU and CUDA
// bindings so that both refuse the same inputs with the same messages.
//
// Layout: the kernels see every sample as one run of `cols` consecutive elements at
// base + row * cols. That holds for w, eps and neumann as given when all three are dense with the
// same strides and the batch dimension outermost (contiguous or channels_last alike: the sum and
// the update do not care about the order inside a sample); otherwise w and eps are copied to
// contiguous memory and neumann is updated through a contiguous copy written back at the end.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "checks/tensor_checks.h"

namespace resflow_cuda {

constexpr const char* kSeriesOp = "resflow_cuda.logdet_series_accumulate_";

inline at::ScalarType series_accumulator_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_logdet_series(const at::Tensor& w, const at::Tensor& eps, const at::Tensor& logdet,
                                const std::optional<at::Tensor>& neumann) {
  check_float_tensor(kSeriesOp, "w", w);
  TORCH_CHECK(w.dim() >= 1, kSeriesOp, ": expected w to have a batch dimension, but got a 0-dimensional tensor");
  check_matches(kSeriesOp, "eps", eps, "w", w);
  TORCH_CHECK(logdet.defined(), kSeriesOp, ": expected logdet to be a tensor, but got None");
  const auto acc = series_accumulator_type(w.scalar_type());
  TORCH_CHECK(logdet.scalar_type() == acc, kSeriesOp, ": expected logdet to have dtype ", acc, " (the accumulation "
              "type of w's ", w.scalar_type(), "), but got ", logdet.scalar_type());
  check_same_device(kSeriesOp, "logdet", logdet, "w", w);
  TORCH_CHECK(logdet.dim() == 1 && logdet.size(0) == w.size(0), kSeriesOp, ": expected logdet to have shape [",
              w.size(0), "] (one entry per sample of w), but got ", logdet.sizes());
  const bool with_neumann = neumann.has_value() && neumann->defined();
  if (with_neumann) {
    check_matches(kSeriesOp, "neumann", *neumann, "w", w);
  }
  check_no_overlap(kSeriesOp, {{"logdet", -1, &logdet}, {"neumann", -1, with_neumann ? &*neumann : nullptr}},
                   {{"w", -1, &w}, {"eps", -1, &eps}});
}

struct SeriesOperands {
  at::Tensor w, eps, neumann;  // neumann: undefined when not given; else the memory the kernel updates
  int64_t rows = 0;
  int64_t cols = 0;
  bool copy_back = false;  // neumann is a contiguous copy of the caller's tensor
};

inline bool rows_in_place(const at::Tensor& t, int64_t cols) {
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) == cols);
}

inline SeriesOperands series_operands(const at::Tensor& w, const at::Tensor& eps,
                                      const std::optional<at::Tensor>& neumann) {
  SeriesOperands out;
  out.rows = w.size(0);
  out.cols = out.rows == 0 ? 0 : w.numel() / out.rows;
  const bool with_neumann = neumann.has_value() && neumann->defined();
  bool direct = rows_in_place(w, out.cols) && eps.strides() == w.strides() && rows_in_place(eps, out.cols);
  if (with_neumann) {
    direct = direct && neumann->strides() == w.strides() && rows_in_place(*neumann, out.cols);
  }
  if (direct) {
    out.w = w;
    out.eps = eps;
    out.neumann = with_neumann ? *neumann : at::Tensor();
    return out;
  }
  out.w = w.contiguous();
  out.eps = eps.contiguous();
  if (with_neumann) {
    out.copy_back = !neumann->is_contiguous();
    out.neumann = neumann->contiguous();
  }
  return out;
}

// After the kernel: the caller's neumann receives the update made in a contiguous copy.
inline void finish_series(const SeriesOperands& operands, const std::optional<at::Tensor>& neumann) {
  if (operands.copy_back) {
    neumann->copy_(operands.neumann);
  }
}

}  // namespace resflow_cuda
