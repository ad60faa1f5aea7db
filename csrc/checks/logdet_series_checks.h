// Argument checks and operand layout of logdet_series_accumulate_, shared by the CPU and CUDA
// bindings so that both refuse the same inputs with the same messages.
//
// Layout: the kernels see every sample as one run of `cols` consecutive elements at
// base + row * cols. That holds for w, eps and neumann as given when all three are dense with the
// same strides and the batch dimension outermost (contiguous or channels_last alike: the sum and
// the update do not care about the order inside a sample); otherwise w, eps and scale are copied to
// contiguous memory and neumann (and w, when scaled) updated through a contiguous copy written back at
// the end.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "checks/tensor_checks.h"

namespace resflow_cuda {

constexpr const char* kSeriesOp = "resflow_cuda.logdet_series_accumulate_";

inline at::ScalarType series_accumulator_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool series_given(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

inline void check_logdet_series(const at::Tensor& w, const at::Tensor& eps, const at::Tensor& logdet,
                                const std::optional<at::Tensor>& neumann, const std::optional<at::Tensor>& scale) {
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
  if (series_given(neumann)) {
    check_matches(kSeriesOp, "neumann", *neumann, "w", w);
  }
  if (series_given(scale)) {
    check_matches(kSeriesOp, "scale", *scale, "w", w);
  }
  // w is written only when scaled
  check_no_overlap(kSeriesOp,
                   {{"logdet", -1, &logdet},
                    {"neumann", -1, series_given(neumann) ? &*neumann : nullptr},
                    {"w", -1, series_given(scale) ? &w : nullptr}},
                   {{"w", -1, series_given(scale) ? nullptr : &w},
                    {"eps", -1, &eps},
                    {"scale", -1, series_given(scale) ? &*scale : nullptr}});
}

struct SeriesOperands {
  at::Tensor w, eps, neumann, scale;  // neumann, scale: undefined when not given; w and neumann the memory updated
  int64_t rows = 0;
  int64_t cols = 0;
  bool copy_back = false;    // neumann is a contiguous copy of the caller's tensor
  bool copy_back_w = false;  // w (scaled) is a contiguous copy of the caller's tensor
};

inline bool rows_in_place(const at::Tensor& t, int64_t cols) {
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) == cols);
}

inline SeriesOperands series_operands(const at::Tensor& w, const at::Tensor& eps,
                                      const std::optional<at::Tensor>& neumann,
                                      const std::optional<at::Tensor>& scale) {
  SeriesOperands out;
  out.rows = w.size(0);
  out.cols = out.rows == 0 ? 0 : w.numel() / out.rows;
  bool direct = rows_in_place(w, out.cols);
  for (const auto* t : {&eps, series_given(neumann) ? &*neumann : nullptr, series_given(scale) ? &*scale : nullptr}) {
    direct = direct && (t == nullptr || (t->strides() == w.strides() && rows_in_place(*t, out.cols)));
  }
  if (direct) {
    out.w = w;
    out.eps = eps;
    out.neumann = series_given(neumann) ? *neumann : at::Tensor();
    out.scale = series_given(scale) ? *scale : at::Tensor();
    return out;
  }
  out.w = w.contiguous();
  out.copy_back_w = series_given(scale) && !w.is_contiguous();
  out.eps = eps.contiguous();
  if (series_given(neumann)) {
    out.copy_back = !neumann->is_contiguous();
    out.neumann = neumann->contiguous();
  }
  if (series_given(scale)) {
    out.scale = scale->contiguous();
  }
  return out;
}

// After the kernel: the caller's neumann (and scaled w) receive the update made in a contiguous copy.
inline void finish_series(const SeriesOperands& operands, const at::Tensor& w,
                          const std::optional<at::Tensor>& neumann) {
  if (operands.copy_back) {
    neumann->copy_(operands.neumann);
  }
  if (operands.copy_back_w) {
    w.copy_(operands.w);
  }
}

}  // namespace resflow_cuda
