// The fused log-det series step (resflow/series_math.h) vectorized with at::vec. Compiled once
// per CPU capability; see cpu_capability.h.
#include "logdet_series_vec.h"

#include <array>
#include <type_traits>

#include "resflow/series_math.h"
#include "vec_utils.h"

namespace resflow_cuda::cpu::CPU_CAPABILITY {
namespace {

// in = {w, eps[, scale][, neumann]}, out = {[w][, neumann]}, in the compute type T. With kScale, w *= scale
// (written back) before the term reads it. Loads of a partial vector zero-fill, so the dead lanes add 0
// to the sum.
template <class T, bool kScale, bool kNeumann>
T series_body(const T* const* in, T* const* out, int64_t n, T coeff) {
  const T* w = in[0];
  const T* eps = in[1];
  const T* scale = kScale ? in[2] : nullptr;
  const T* neumann_in = kNeumann ? in[kScale ? 3 : 2] : nullptr;
  T* w_out = kScale ? out[0] : nullptr;
  T* neumann_out = kNeumann ? out[kScale ? 1 : 0] : nullptr;
  Vectorized<T> acc(T(0));
  const Vectorized<T> vc(coeff);
  for_each_vector<T>(n, [&](int64_t i, int64_t c) {
    Vectorized<T> wv = load(w + i, c);
    if constexpr (kScale) {
      wv = math::scaled(wv, load(scale + i, c));
      store(wv, w_out + i, c);
    }
    acc = acc + math::series_product(wv, load(eps + i, c));
    if constexpr (kNeumann) {
      store(math::neumann_update(load(neumann_in + i, c), wv, vc), neumann_out + i, c);
    }
  });
  return sum_lanes(acc);
}

}  // namespace

template <class scalar_t>
at::opmath_type<scalar_t> logdet_series_vec(scalar_t* w, const scalar_t* eps, const scalar_t* scale, scalar_t* neumann,
                                            int64_t n, at::opmath_type<scalar_t> neumann_coeff) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto body = [&](auto with_scale, auto with_neumann) {
    constexpr bool kScale = decltype(with_scale)::value;
    constexpr bool kNeumann = decltype(with_neumann)::value;
    return [&](const acc_t* const* in, acc_t* const* out, int64_t len) {
      return series_body<acc_t, kScale, kNeumann>(in, out, len, neumann_coeff);
    };
  };
  using std::array;
  using No = std::false_type;
  using Yes = std::true_type;
  if (scale == nullptr && neumann == nullptr) {
    return run_in_compute_type<2, 0>(array<const scalar_t*, 2>{w, eps}, array<scalar_t*, 0>{}, n, body(No{}, No{}));
  }
  if (scale == nullptr) {
    return run_in_compute_type<3, 1>(array<const scalar_t*, 3>{w, eps, neumann}, array<scalar_t*, 1>{neumann}, n,
                                     body(No{}, Yes{}));
  }
  if (neumann == nullptr) {
    return run_in_compute_type<3, 1>(array<const scalar_t*, 3>{w, eps, scale}, array<scalar_t*, 1>{w}, n,
                                     body(Yes{}, No{}));
  }
  return run_in_compute_type<4, 2>(array<const scalar_t*, 4>{w, eps, scale, neumann}, array<scalar_t*, 2>{w, neumann},
                                   n, body(Yes{}, Yes{}));
}

#define RESFLOW_INSTANTIATE(scalar_t)                                                                 \
  template at::opmath_type<scalar_t> logdet_series_vec<scalar_t>(scalar_t*, const scalar_t*, const scalar_t*, \
                                                                 scalar_t*, int64_t, at::opmath_type<scalar_t>);

RESFLOW_FOR_EACH_KERNEL_DTYPE(RESFLOW_INSTANTIATE)
#undef RESFLOW_INSTANTIATE

}  // namespace resflow_cuda::cpu::CPU_CAPABILITY
