// The dual maps of power iteration for induced p->q norms (Residual Flows, Chen et al. 2019; the
// QETLAB induced-matrix-norm method), as the CUDA kernels evaluate them from block reductions.
// Torch-free, HOST_DEVICE. The CPU ops compute the same maps with ATen ops
// (csrc/host/power_iteration_host.h) to match the PyTorch reference bit for bit.
//   domain p (applied to v):   p = 2: v/max(||v||, 1e-12); p = 1: one-hot at argmax|v|;
//                              else sign(v) t / (sum t^p)^(1/p) with t = (|v|/max|v|)^(1/(p-1))
//   codomain q (applied to u): q = 2: l2; q = inf: one-hot; else sign(u) t / (sum t^r)^(1/r),
//                              t = (|u|/max|u|)^(q-1), r = q/(q-1) (r = inf for q = 1).
// sign(0) is taken as 1, as in the reference.
#pragma once

#include <math.h>

#include "resflow/macros.h"

namespace resflow_cuda::math {

constexpr double kNormalizeEps = 1e-12;  // F.normalize's default

enum class DualKind : int { L2 = 0, ProjMax = 1, Hoelder = 2 };

template <class T>
struct DualMap {
  DualKind kind;
  T exponent;  // Hoelder: t = (|x| / max|x|)^exponent
  T dual_p;    // Hoelder: denominator (sum t^dual_p)^(1/dual_p); may be inf
};

template <class T>
inline DualMap<T> domain_dual_map(double p) {
  if (p == 2) {
    return {DualKind::L2, T(0), T(0)};
  }
  if (p == 1) {
    return {DualKind::ProjMax, T(0), T(0)};
  }
  return {DualKind::Hoelder, static_cast<T>(1.0 / (p - 1)), static_cast<T>(p)};
}

template <class T>
inline DualMap<T> codomain_dual_map(double q) {
  if (q == 2) {
    return {DualKind::L2, T(0), T(0)};
  }
  if (isinf(q)) {
    return {DualKind::ProjMax, T(0), T(0)};
  }
  return {DualKind::Hoelder, static_cast<T>(q - 1), static_cast<T>(q == 1 ? INFINITY : q / (q - 1))};
}

RESFLOW_HOST_DEVICE_INLINE float pow_(float a, float b) { return powf(a, b); }
RESFLOW_HOST_DEVICE_INLINE double pow_(double a, double b) { return ::pow(a, b); }
RESFLOW_HOST_DEVICE_INLINE float sqrt_(float a) { return sqrtf(a); }
RESFLOW_HOST_DEVICE_INLINE double sqrt_(double a) { return ::sqrt(a); }
RESFLOW_HOST_DEVICE_INLINE float abs_(float a) { return fabsf(a); }
RESFLOW_HOST_DEVICE_INLINE double abs_(double a) { return ::fabs(a); }

// x / |x| with 0 (and NaN) taken as 1.
template <class T>
RESFLOW_HOST_DEVICE_INLINE T sign_or_one(T x) {
  const T s = x / abs_(x);
  return s != s ? T(1) : s;
}

// t = (|x| / max|x|)^exponent of the Hoelder map.
template <class T>
RESFLOW_HOST_DEVICE_INLINE T hoelder_magnitude(T x, T max_abs, T exponent) {
  return pow_(abs_(x) / max_abs, exponent);
}

// Element k of the dual map of raw, given its reductions: scale (the l2 norm clamped to eps, or
// the Hoelder denominator), max_abs (Hoelder) and one_hot (ProjMax: the index of max |raw|).
template <class T>
RESFLOW_HOST_DEVICE_INLINE T dual_map_value(const DualMap<T>& map, T raw, long long k, T scale, T max_abs,
                                            long long one_hot) {
  if (map.kind == DualKind::L2) {
    return raw / scale;
  }
  if (map.kind == DualKind::ProjMax) {
    return k == one_hot ? T(1) : T(0);
  }
  return sign_or_one(raw) * hoelder_magnitude(raw, max_abs, map.exponent) / scale;
}

// The power-iteration stopping test: ||x - x_old|| / sqrt(len) < atol + rtol * max(x). The caller
// passes sqrt(len), a loop invariant it computes once (on a GPU, in the host's launch arguments: a
// sqrt hoisted out of the kernel's loop stays live across its slow-path calls and spills).
template <class T>
RESFLOW_HOST_DEVICE_INLINE bool step_converged(T squared_change, T sqrt_len, T max_value, T atol, T rtol) {
  return sqrt_(squared_change) / sqrt_len < max_value * rtol + atol;
}

}  // namespace resflow_cuda::math
