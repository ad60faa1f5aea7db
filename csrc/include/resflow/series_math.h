// One element of the fused log-det series step (Residual Flows' power series), shared by the CPU
// (at::vec vectors) and CUDA (scalars) kernels: the k-th vector-Jacobian product w_k contributes
// w·eps to the per-sample Hutchinson term <w_k, eps> and c·w to the Neumann vector.
// Torch-free; V is a scalar or a vector type with + and *.
#pragma once

#include "macros.h"

namespace resflow_cuda::math {

// w·eps: one element of <w_k, eps>, summed over the sample by the caller in the compute type.
template <class V>
RESFLOW_HOST_DEVICE_INLINE V series_product(const V& w, const V& eps) {
  return w * eps;
}

// w·s: the last elementwise product of the term's vector-Jacobian chain (phi' of the branch's first
// step), when the series step takes it over.
template <class V>
RESFLOW_HOST_DEVICE_INLINE V scaled(const V& w, const V& s) {
  return w * s;
}

// neumann + coeff·w: the Neumann vector after term k (coeff = (-1)^k c_k).
template <class V>
RESFLOW_HOST_DEVICE_INLINE V neumann_update(const V& neumann, const V& w, const V& coeff) {
  return neumann + coeff * w;
}

}  // namespace resflow_cuda::math
