// LipSwish CPU kernels (Residual Flows, Chen et al. 2019): f(x) = x·σ(βx)/1.1 and its
// derivatives, vectorized with at::vec over resflow/lipswish_math.h. Compiled once per CPU
// capability; see cpu_capability.h.
#include "lipswish_vec.h"

#include "resflow/lipswish_math.h"
#include "vec_utils.h"

namespace resflow_cuda::cpu::CPU_CAPABILITY {
namespace {

template <class T>
using Point = math::LipSwishPoint<VecOps<T>, Vectorized<T>>;

// The float/double bodies: in/out are arrays of pointers in the compute type T.
template <class T>
T forward_body(const T* const* in, T* const* out, int64_t n, const LipSwishScalars<T>& s) {
  const Vectorized<T> beta(s.beta);
  const T* x = in[0];
  T* y = out[0];
  T* dydx = out[1];
  if (dydx == nullptr) {
    for_each_vector<T>(n, [&](int64_t i, int64_t c) {
      store(math::lipswish_value<VecOps<T>>(load(x + i, c), beta), y + i, c);
    });
  } else {
    for_each_vector<T>(n, [&](int64_t i, int64_t c) {
      const Point<T> pt(load(x + i, c), beta);
      store(pt.value(), y + i, c);
      store(pt.d_x(), dydx + i, c);
    });
  }
  return T(0);
}

template <class T>
T backward_body(const T* const* in, T* const* out, int64_t n, const LipSwishScalars<T>& s) {
  const Vectorized<T> beta(s.beta), dbeta(s.dbeta);
  const T* grad = in[0];
  const T* x = in[1];
  T* grad_x = out[0];
  Vectorized<T> acc(T(0));
  for_each_vector<T>(n, [&](int64_t i, int64_t c) {
    Vectorized<T> gb;
    const Vectorized<T> gx = math::lipswish_backward_element<VecOps<T>>(load(grad + i, c), load(x + i, c),
                                                                        beta, dbeta, gb);
    store(gx, grad_x + i, c);
    acc = acc + first_lanes(gb, c);
  });
  return sum_lanes(acc);
}

template <class T>
T double_backward_body(const T* const* in, T* const* out, int64_t n, const LipSwishScalars<T>& s) {
  const Vectorized<T> beta(s.beta), dbeta(s.dbeta), d2beta(s.d2beta), k(s.gg_beta);
  const T* grad = in[0];
  const T* gg_x = in[1];
  const T* x = in[2];
  T* grad_grad = out[0];
  T* grad_x = out[1];
  Vectorized<T> acc(T(0));
  for_each_vector<T>(n, [&](int64_t i, int64_t c) {
    Vectorized<T> gg, gx, gb;
    math::lipswish_double_backward_element<VecOps<T>>(load(grad + i, c), load(gg_x + i, c), load(x + i, c), k,
                                                      beta, dbeta, d2beta, gg, gx, gb);
    store(gg, grad_grad + i, c);
    store(gx, grad_x + i, c);
    acc = acc + first_lanes(gb, c);
  });
  return sum_lanes(acc);
}

}  // namespace

template <class scalar_t>
void lipswish_forward_vec(const scalar_t* x, scalar_t* y, scalar_t* dydx, int64_t n,
                          const LipSwishScalars<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  run_in_compute_type<1, 2>(std::array<const scalar_t*, 1>{x}, std::array<scalar_t*, 2>{y, dydx}, n,
                            [&](const acc_t* const* in, acc_t* const* out, int64_t len) {
                              return forward_body<acc_t>(in, out, len, s);
                            });
}

template <class scalar_t>
at::opmath_type<scalar_t> lipswish_backward_vec(const scalar_t* grad, const scalar_t* x, scalar_t* grad_x,
                                                int64_t n, const LipSwishScalars<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  return run_in_compute_type<2, 1>(std::array<const scalar_t*, 2>{grad, x}, std::array<scalar_t*, 1>{grad_x}, n,
                                   [&](const acc_t* const* in, acc_t* const* out, int64_t len) {
                                     return backward_body<acc_t>(in, out, len, s);
                                   });
}

template <class scalar_t>
at::opmath_type<scalar_t> lipswish_double_backward_vec(const scalar_t* grad, const scalar_t* gg_x,
                                                       const scalar_t* x, scalar_t* grad_grad, scalar_t* grad_x,
                                                       int64_t n,
                                                       const LipSwishScalars<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  return run_in_compute_type<3, 2>(std::array<const scalar_t*, 3>{grad, gg_x, x},
                                   std::array<scalar_t*, 2>{grad_grad, grad_x}, n,
                                   [&](const acc_t* const* in, acc_t* const* out, int64_t len) {
                                     return double_backward_body<acc_t>(in, out, len, s);
                                   });
}

#define RESFLOW_INSTANTIATE(scalar_t)                                                                      \
  template void lipswish_forward_vec<scalar_t>(const scalar_t*, scalar_t*, scalar_t*, int64_t,             \
                                               const LipSwishScalars<at::opmath_type<scalar_t>>&);         \
  template at::opmath_type<scalar_t> lipswish_backward_vec<scalar_t>(                                      \
      const scalar_t*, const scalar_t*, scalar_t*, int64_t, const LipSwishScalars<at::opmath_type<scalar_t>>&); \
  template at::opmath_type<scalar_t> lipswish_double_backward_vec<scalar_t>(                               \
      const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, scalar_t*, int64_t,                    \
      const LipSwishScalars<at::opmath_type<scalar_t>>&);

RESFLOW_FOR_EACH_KERNEL_DTYPE(RESFLOW_INSTANTIATE)
#undef RESFLOW_INSTANTIATE

}  // namespace resflow_cuda::cpu::CPU_CAPABILITY
