// Helpers for the per-capability kernels in this directory: tail-safe loads and stores, the
// Ops adapter that lets the torch-free math headers run on at::vec::Vectorized, and the float
// staging that computes Half/BFloat16 in float. Include only from csrc/cpu/vec/*.cpp, which are
// compiled once per CPU capability (CPU_CAPABILITY names the namespace).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

// Applies M to every dtype the CPU kernels are instantiated for.
#define RESFLOW_FOR_EACH_KERNEL_DTYPE(M) M(float) M(double) M(c10::Half) M(c10::BFloat16)

namespace resflow_cuda::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Ops for resflow/*_math.h on vectors (ScalarOps is the scalar twin).
template <class T>
struct VecOps {
  using V = Vectorized<T>;
  static V exp(const V& v) { return v.exp(); }
  static V select_nonneg(const V& z, const V& a, const V& b) { return V::blendv(b, a, z >= V(T(0))); }
};

// Loads / stores `count` lanes (count <= size); the partial forms zero-fill and write only count.
template <class T>
inline Vectorized<T> load(const T* p, int64_t count) {
  return count == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, count);
}

template <class T>
inline void store(const Vectorized<T>& v, T* p, int64_t count) {
  if (count == Vectorized<T>::size()) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

// Calls body(offset, count) over [0, n) one vector of T at a time.
template <class T, class Body>
inline void for_each_vector(int64_t n, const Body& body) {
  constexpr int64_t kWidth = Vectorized<T>::size();
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) {
    body(i, kWidth);
  }
  if (i < n) {
    body(i, n - i);
  }
}

// Keeps the first `count` lanes of v and zeroes the rest (for sums over a partial vector).
template <class T>
inline Vectorized<T> first_lanes(const Vectorized<T>& v, int64_t count) {
  return count == Vectorized<T>::size() ? v : Vectorized<T>::set(Vectorized<T>(T(0)), v, count);
}

template <class T>
inline T sum_lanes(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

// Runs a float kernel `fn(const float* const* in, float* const* out, int64_t n) -> float` over
// Half/BFloat16 arrays: each block is widened into stack buffers, computed, and narrowed back
// (null outputs are skipped). Returns the sum of fn's results. For float/double arrays fn runs
// on them directly.
template <size_t kIn, size_t kOut, class scalar_t, class Fn>
inline at::opmath_type<scalar_t> run_in_compute_type(const std::array<const scalar_t*, kIn>& in,
                                                     const std::array<scalar_t*, kOut>& out,
                                                     int64_t n, const Fn& fn) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return fn(in.data(), out.data(), n);
  } else {
    using VS = Vectorized<scalar_t>;
    using VF = Vectorized<float>;
    constexpr int64_t kBlock = 16 * VS::size();
    alignas(64) float in_buf[kIn][kBlock];
    alignas(64) float out_buf[kOut == 0 ? 1 : kOut][kBlock];
    std::array<const float*, kIn> in_f;
    std::array<float*, kOut> out_f;
    acc_t total = 0;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t len = std::min(kBlock, n - b);
      for (size_t j = 0; j < kIn; ++j) {
        for_each_vector<scalar_t>(len, [&](int64_t i, int64_t c) {
          auto [lo, hi] = at::vec::convert_to_float<scalar_t>(load(in[j] + b + i, c));
          lo.store(in_buf[j] + i);
          hi.store(in_buf[j] + i + VF::size());
        });
        in_f[j] = in_buf[j];
      }
      for (size_t j = 0; j < kOut; ++j) {
        out_f[j] = out[j] == nullptr ? nullptr : out_buf[j];
      }
      total += fn(in_f.data(), out_f.data(), len);
      for (size_t j = 0; j < kOut; ++j) {
        if (out[j] == nullptr) {
          continue;
        }
        for_each_vector<scalar_t>(len, [&](int64_t i, int64_t c) {
          const VS v = at::vec::convert_from_float<scalar_t>(VF::loadu(out_buf[j] + i),
                                                             VF::loadu(out_buf[j] + i + VF::size()));
          store(v, out[j] + b + i, c);
        });
      }
    }
    return total;
  }
}

}  // namespace resflow_cuda::cpu::CPU_CAPABILITY
