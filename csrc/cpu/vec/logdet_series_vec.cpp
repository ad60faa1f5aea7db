// The fused log-det series step (resflow/series_math.h) vectorized with at::vec. Compiled once
// per CPU capability; see cpu_capability.h.
#include "logdet_series_vec.h"

#include "resflow/series_math.h"
#include "vec_utils.h"

namespace resflow_cuda::cpu::CPU_CAPABILITY {
namespace {

// in = {w, eps[, neumann]}, out = {neumann or nothing}, in the compute type T. Loads of a
// partial vector zero-fill, so the dead lanes add 0 to the sum.
template <class T>
T series_body(const T* const* in, T* const* out, int64_t n, bool with_neumann, T coeff) {
  const T* w = in[0];
  const T* eps = in[1];
  Vectorized<T> acc(T(0));
  if (!with_neumann) {
    for_each_vector<T>(n, [&](int64_t i, int64_t c) {
      acc = acc + math::series_product(load(w + i, c), load(eps + i, c));
    });
    return sum_lanes(acc);
  }
  const T* neumann_in = in[2];
  T* neumann_out = out[0];
  const Vectorized<T> vc(coeff);
  for_each_vector<T>(n, [&](int64_t i, int64_t c) {
    const Vectorized<T> wv = load(w + i, c);
    acc = acc + math::series_product(wv, load(eps + i, c));
    store(math::neumann_update(load(neumann_in + i, c), wv, vc), neumann_out + i, c);
  });
  return sum_lanes(acc);
}

}  // namespace

template <class scalar_t>
at::opmath_type<scalar_t> logdet_series_vec(const scalar_t* w, const scalar_t* eps, scalar_t* neumann, int64_t n,
                                            at::opmath_type<scalar_t> neumann_coeff) {
  using acc_t = at::opmath_type<scalar_t>;
  if (neumann == nullptr) {
    return run_in_compute_type<2, 0>(std::array<const scalar_t*, 2>{w, eps}, std::array<scalar_t*, 0>{}, n,
                                     [&](const acc_t* const* in, acc_t* const* out, int64_t len) {
                                       return series_body<acc_t>(in, out, len, false, neumann_coeff);
                                     });
  }
  return run_in_compute_type<3, 1>(std::array<const scalar_t*, 3>{w, eps, neumann}, std::array<scalar_t*, 1>{neumann},
                                   n, [&](const acc_t* const* in, acc_t* const* out, int64_t len) {
                                     return series_body<acc_t>(in, out, len, true, neumann_coeff);
                                   });
}

#define RESFLOW_INSTANTIATE(scalar_t)                                                                 \
  template at::opmath_type<scalar_t> logdet_series_vec<scalar_t>(const scalar_t*, const scalar_t*, scalar_t*, \
                                                                 int64_t, at::opmath_type<scalar_t>);

RESFLOW_FOR_EACH_KERNEL_DTYPE(RESFLOW_INSTANTIATE)
#undef RESFLOW_INSTANTIATE

}  // namespace resflow_cuda::cpu::CPU_CAPABILITY
