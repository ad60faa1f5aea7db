// Power iteration for spectral / induced p->q norms of dense matrices, CPU kernels (Residual
// Flows, Chen et al. 2019): at::vec matrix-vector products and the dual maps of
// resflow/power_iteration_math.h, which the CUDA kernel shares. Compiled once per CPU capability.
#include "power_iteration_vec.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "vec_utils.h"

namespace resflow_cuda::cpu::CPU_CAPABILITY {
namespace {

// out[i] = sum_j W[i, j] x[j]
template <class T>
void matvec(const T* w, int64_t m, int64_t n, const T* x, T* out) {
  using V = Vectorized<T>;
  for (int64_t i = 0; i < m; ++i) {
    const T* row = w + i * n;
    V acc(T(0));
    for_each_vector<T>(n, [&](int64_t j, int64_t c) { acc = at::vec::fmadd(load(row + j, c), load(x + j, c), acc); });
    out[i] = sum_lanes(acc);
  }
}

// out[j] = sum_i W[i, j] y[i]
template <class T>
void rmatvec(const T* w, int64_t m, int64_t n, const T* y, T* out) {
  using V = Vectorized<T>;
  std::fill(out, out + n, T(0));
  for (int64_t i = 0; i < m; ++i) {
    const T* row = w + i * n;
    const V yi(y[i]);
    for_each_vector<T>(n, [&](int64_t j, int64_t c) {
      store(at::vec::fmadd(load(row + j, c), yi, load(out + j, c)), out + j, c);
    });
  }
}

template <class T>
struct Change {
  T squared;
  T max;
};

// x <- dual map of raw; returns sum (x_new - x_old)^2 and max x_new.
template <class T>
Change<T> apply_dual_map(T* x, const T* raw, int64_t len, const math::DualMap<T>& map) {
  T scale = T(1), max_abs = T(0);
  int64_t one_hot = -1;
  if (map.kind == math::DualKind::L2) {
    T ss = T(0);
    for (int64_t k = 0; k < len; ++k) {
      ss += raw[k] * raw[k];
    }
    scale = std::max(std::sqrt(ss), T(math::kNormalizeEps));
  } else if (map.kind == math::DualKind::ProjMax) {
    T best = T(0);
    for (int64_t k = 0; k < len; ++k) {  // first index of the largest |raw|, NaN counting as largest
      const T a = std::abs(raw[k]);
      const bool better = one_hot < 0 || (std::isnan(a) && !std::isnan(best)) ||
                          (!std::isnan(a) && !std::isnan(best) && a > best);
      if (better) {
        best = a;
        one_hot = k;
      }
    }
  } else {
    for (int64_t k = 0; k < len; ++k) {
      const T a = std::abs(raw[k]);
      max_abs = std::isnan(a) || a > max_abs ? a : max_abs;
    }
    T s = T(0);
    for (int64_t k = 0; k < len; ++k) {
      s += math::pow_(math::hoelder_magnitude(raw[k], max_abs, map.exponent), map.dual_p);
    }
    scale = math::pow_(s, T(1) / map.dual_p);
  }
  Change<T> change{T(0), -std::numeric_limits<T>::infinity()};
  for (int64_t k = 0; k < len; ++k) {
    const T value = math::dual_map_value(map, raw[k], k, scale, max_abs, one_hot);
    const T d = value - x[k];
    change.squared += d * d;
    change.max = std::isnan(value) || value > change.max ? value : change.max;
    x[k] = value;
  }
  return change;
}

}  // namespace

template <class T>
int64_t power_iteration_dense_vec(const DensePowerIteration<T>& a, T* sigma) {
  const T sqrt_m = math::sqrt_(T(a.m)), sqrt_n = math::sqrt_(T(a.n));
  int64_t it = 0;
  while (it < a.max_iterations) {
    Change<T> du, dv;
    if (a.u_first) {
      matvec(a.weight, a.m, a.n, a.v, a.workspace);
      du = apply_dual_map(a.u, a.workspace, a.m, a.u_map);
      rmatvec(a.weight, a.m, a.n, a.u, a.workspace);
      dv = apply_dual_map(a.v, a.workspace, a.n, a.v_map);
    } else {
      rmatvec(a.weight, a.m, a.n, a.u, a.workspace);
      dv = apply_dual_map(a.v, a.workspace, a.n, a.v_map);
      matvec(a.weight, a.m, a.n, a.v, a.workspace);
      du = apply_dual_map(a.u, a.workspace, a.m, a.u_map);
    }
    ++it;
    if (a.use_tolerance && math::step_converged(du.squared, sqrt_m, du.max, a.atol, a.rtol) &&
        math::step_converged(dv.squared, sqrt_n, dv.max, a.atol, a.rtol)) {
      break;
    }
  }
  matvec(a.weight, a.m, a.n, a.v, a.workspace);
  T s = T(0);
  for (int64_t i = 0; i < a.m; ++i) {
    s += a.u[i] * a.workspace[i];
  }
  *sigma = s;
  return it;
}

template int64_t power_iteration_dense_vec<float>(const DensePowerIteration<float>&, float*);
template int64_t power_iteration_dense_vec<double>(const DensePowerIteration<double>&, double*);

}  // namespace resflow_cuda::cpu::CPU_CAPABILITY
