// LipSwish CUDA kernels (Residual Flows, Chen et al. 2019): f(x) = x·σ(βx)/1.1, β = softplus(b),
// and its first and second derivatives from resflow/lipswish_math.h, which the CPU kernels share.
// Kernel bodies and their launchers, torch-free: lipswish_cuda.cu binds tensors to the launchers
// and the emulated test extension runs the same launchers on CPU memory.
// beta (the raw parameter) and gg_beta are read from device memory by every thread: no host sync.
// grad_beta is a grid-wide sum: per-block sums (block_sum), then finish_sum_kernel; no atomics.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernel_utils.cuh"
#include "resflow/lipswish_math.h"

namespace resflow_cuda::cuda {

template <typename acc_t>
using LipSwishPointT = math::LipSwishPoint<math::ScalarOps, acc_t>;

template <typename scalar_t, typename acc_t, int VEC, bool WITH_DERIVATIVE>
__global__ void __launch_bounds__(kElementwiseThreads, elementwise_min_blocks<scalar_t>())
    lipswish_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ beta,
                            scalar_t* __restrict__ y, scalar_t* __restrict__ dydx, int64_t n) {
  const acc_t b = math::lipswish_params(static_cast<acc_t>(beta[0])).beta;
  for_each_pack<VEC>(n, [&](int64_t i, int count) {
    const Pack<scalar_t, VEC> xv = load_pack<scalar_t, VEC>(x, i, count);
    Pack<scalar_t, VEC> yv;
    Pack<scalar_t, VEC> dv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t xj = static_cast<acc_t>(xv.v[j]);
      if (WITH_DERIVATIVE) {
        const LipSwishPointT<acc_t> pt(xj, b);
        yv.v[j] = static_cast<scalar_t>(pt.value());
        dv.v[j] = static_cast<scalar_t>(pt.d_x());
      } else {
        yv.v[j] = static_cast<scalar_t>(math::lipswish_value<math::ScalarOps>(xj, b));
      }
    }
    store_pack<scalar_t, VEC>(y, i, count, yv);
    if (WITH_DERIVATIVE) {
      store_pack<scalar_t, VEC>(dydx, i, count, dv);
    }
  });
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kElementwiseThreads, elementwise_min_blocks<scalar_t>())
    lipswish_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                             const scalar_t* __restrict__ beta, scalar_t* __restrict__ grad_x,
                             double* __restrict__ block_sums, int64_t n) {
  const math::LipSwishParams<acc_t> p = math::lipswish_params(static_cast<acc_t>(beta[0]));
  acc_t acc = acc_t(0);
  for_each_pack<VEC>(n, [&](int64_t i, int count) {
    const Pack<scalar_t, VEC> gv = load_pack<scalar_t, VEC>(grad, i, count);
    const Pack<scalar_t, VEC> xv = load_pack<scalar_t, VEC>(x, i, count);
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t gb;
      out.v[j] = static_cast<scalar_t>(math::lipswish_backward_element<math::ScalarOps>(
          static_cast<acc_t>(gv.v[j]), static_cast<acc_t>(xv.v[j]), p.beta, p.dbeta, gb));
      acc += j < count ? gb : acc_t(0);
    }
    store_pack<scalar_t, VEC>(grad_x, i, count, out);
  });
  acc = block_sum<acc_t, kElementwiseThreads>(acc);
  if (threadIdx.x == 0) {
    block_sums[blockIdx.x] = static_cast<double>(acc);
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kElementwiseThreads, elementwise_min_blocks<scalar_t>())
    lipswish_double_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ gg_x,
                                    const scalar_t* __restrict__ x, const scalar_t* __restrict__ beta,
                                    const scalar_t* __restrict__ gg_beta, scalar_t* __restrict__ grad_grad,
                                    scalar_t* __restrict__ grad_x, double* __restrict__ block_sums, int64_t n) {
  const math::LipSwishParams<acc_t> p = math::lipswish_params(static_cast<acc_t>(beta[0]));
  const acc_t k = static_cast<acc_t>(gg_beta[0]);
  acc_t acc = acc_t(0);
  for_each_pack<VEC>(n, [&](int64_t i, int count) {
    const Pack<scalar_t, VEC> gv = load_pack<scalar_t, VEC>(grad, i, count);
    const Pack<scalar_t, VEC> hv = load_pack<scalar_t, VEC>(gg_x, i, count);
    const Pack<scalar_t, VEC> xv = load_pack<scalar_t, VEC>(x, i, count);
    Pack<scalar_t, VEC> gg_out;
    Pack<scalar_t, VEC> gx_out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t gg, gx, gb;
      math::lipswish_double_backward_element<math::ScalarOps>(static_cast<acc_t>(gv.v[j]), static_cast<acc_t>(hv.v[j]),
                                                              static_cast<acc_t>(xv.v[j]), k, p.beta, p.dbeta,
                                                              p.d2beta, gg, gx, gb);
      gg_out.v[j] = static_cast<scalar_t>(gg);
      gx_out.v[j] = static_cast<scalar_t>(gx);
      acc += j < count ? gb : acc_t(0);
    }
    store_pack<scalar_t, VEC>(grad_grad, i, count, gg_out);
    store_pack<scalar_t, VEC>(grad_x, i, count, gx_out);
  });
  acc = block_sum<acc_t, kElementwiseThreads>(acc);
  if (threadIdx.x == 0) {
    block_sums[blockIdx.x] = static_cast<double>(acc);
  }
}

// Calls f(std::integral_constant<int, VEC>) for the plan's pack width.
template <typename scalar_t, typename F>
void with_pack_width(const ElementwisePlan& plan, const F& f) {
  constexpr int kWide = kMaxAccessBytes / static_cast<int>(sizeof(scalar_t));
  if (plan.vec == kWide) {
    f(std::integral_constant<int, kWide>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// The launchers. Every pointer is device memory; dydx may be null. block_sums holds
// plan.blocks doubles. grad_beta receives the gradient of the raw beta.
template <typename scalar_t, typename acc_t>
void launch_lipswish_forward(const ElementwisePlan& plan, const scalar_t* x, const scalar_t* beta, scalar_t* y,
                             scalar_t* dydx, int64_t n, cudaStream_t stream) {
  with_pack_width<scalar_t>(plan, [&](auto width) {
    constexpr int VEC = decltype(width)::value;
    if (dydx == nullptr) {
      const auto kernel = &lipswish_forward_kernel<scalar_t, acc_t, VEC, false>;
      RESFLOW_LAUNCH(kernel, plan.blocks, plan.threads, 0, stream)(x, beta, y, dydx, n);
    } else {
      const auto kernel = &lipswish_forward_kernel<scalar_t, acc_t, VEC, true>;
      RESFLOW_LAUNCH(kernel, plan.blocks, plan.threads, 0, stream)(x, beta, y, dydx, n);
    }
  });
}

template <typename scalar_t, typename acc_t>
void launch_lipswish_backward(const ElementwisePlan& plan, const scalar_t* grad, const scalar_t* x,
                              const scalar_t* beta, scalar_t* grad_x, double* block_sums, scalar_t* grad_beta,
                              int64_t n, cudaStream_t stream) {
  with_pack_width<scalar_t>(plan, [&](auto width) {
    const auto kernel = &lipswish_backward_kernel<scalar_t, acc_t, decltype(width)::value>;
    RESFLOW_LAUNCH(kernel, plan.blocks, plan.threads, 0, stream)(grad, x, beta, grad_x, block_sums, n);
  });
  const auto finish = &finish_sum_kernel<scalar_t>;
  RESFLOW_LAUNCH(finish, 1, kElementwiseThreads, 0, stream)(block_sums, plan.blocks, grad_beta);
}

template <typename scalar_t, typename acc_t>
void launch_lipswish_double_backward(const ElementwisePlan& plan, const scalar_t* grad, const scalar_t* gg_x,
                                     const scalar_t* x, const scalar_t* beta, const scalar_t* gg_beta,
                                     scalar_t* grad_grad, scalar_t* grad_x, double* block_sums, scalar_t* grad_beta,
                                     int64_t n, cudaStream_t stream) {
  with_pack_width<scalar_t>(plan, [&](auto width) {
    const auto kernel = &lipswish_double_backward_kernel<scalar_t, acc_t, decltype(width)::value>;
    RESFLOW_LAUNCH(kernel, plan.blocks, plan.threads, 0, stream)(grad, gg_x, x, beta, gg_beta, grad_grad, grad_x,
                                                                 block_sums, n);
  });
  const auto finish = &finish_sum_kernel<scalar_t>;
  RESFLOW_LAUNCH(finish, 1, kElementwiseThreads, 0, stream)(block_sums, plan.blocks, grad_beta);
}

}  // namespace resflow_cuda::cuda
