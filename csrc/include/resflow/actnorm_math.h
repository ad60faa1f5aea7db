// ActNorm (Glow's per-channel affine map, as residual-flows' act_norm layers compute it) for one element,
// shared by the CPU and CUDA kernels: y = (x + b) e^w, and the log-density after it, logp + sign · positions ·
// Σ_c w_c (sign -1 in forward, the log-det being subtracted). Gradients: dL/dx = g e^w, dL/db = Σ g e^w,
// dL/dw = Σ g y + sign · positions · Σ_b dL/dlogp. T is the compute type (float, or double for float64).
// Torch-free.
#pragma once

#include <math.h>

#include "macros.h"

namespace resflow_cuda::math {

RESFLOW_HOST_DEVICE_INLINE float actnorm_scale(float w) { return expf(w); }
RESFLOW_HOST_DEVICE_INLINE double actnorm_scale(double w) { return ::exp(w); }

// y = (x + b) e^w, with scale = e^w.
template <class T>
RESFLOW_HOST_DEVICE_INLINE T actnorm_value(T x, T b, T scale) {
  return (x + b) * scale;
}

// logp + sign · positions · Σ w (signed_positions = sign · positions).
template <class T>
RESFLOW_HOST_DEVICE_INLINE T actnorm_logp(T logp, T weight_sum, T signed_positions) {
  return logp + signed_positions * weight_sum;
}

}  // namespace resflow_cuda::math
