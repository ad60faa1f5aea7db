// CUDA kernels of the fused dense block (csrc/composite/dense_jacobian_block.cpp) over
// resflow/dense_jacobian_math.h, which the CPU kernels share: the LipSwish step of a forward-mode Jacobian
// stack and its backward, the per-sample power series, and the Lipschitz weight normalization of many
// layers in one launch. Kernel bodies and their launchers, torch-free: dense_jacobian_cuda.cu binds
// tensors to the launchers and the emulated test extension runs the same launchers on CPU memory.
// beta is read from device memory; coefficients and layer lists travel by value in the kernel
// parameters: no host sync, capturable in a CUDA graph. Sums across threads are block sums and a
// fixed-order second pass; no atomics.
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"
#include "resflow/dense_jacobian_math.h"

namespace resflow_cuda::cuda {

// One thread per element of the primal rows (B x H): h, f(h), and f'(h) times each tangent row; when
// kept_a is not null, also the first two blocks of a into kept_a and the second of z into kept_t.
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    jacobian_lipswish_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ bias,
                             const scalar_t* __restrict__ beta, scalar_t* __restrict__ h, scalar_t* __restrict__ a,
                             scalar_t* __restrict__ kept_a, scalar_t* __restrict__ kept_t, int64_t batch,
                             int64_t width, int64_t blocks) {
  const scalar_t b = math::lipswish_params(beta[0]).beta;
  const int64_t n = batch * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const scalar_t hv = z[i] + (bias == nullptr ? scalar_t(0) : bias[i % width]);
    const math::LipSwishPoint<math::ScalarOps, scalar_t> pt(hv, b);
    h[i] = hv;
    a[i] = pt.value();
    const scalar_t slope = pt.d_x();
    for (int64_t s = 1; s < blocks; ++s) {
      a[s * n + i] = slope * z[s * n + i];
    }
    if (kept_a != nullptr) {
      kept_a[i] = a[i];
      kept_a[n + i] = a[n + i];
      kept_t[i] = z[n + i];
    }
  }
}

// One thread per element of h (B x H): the co-tangents of h and of each of the `blocks` tangents, and
// per-block sums of beta's gradient.
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    jacobian_lipswish_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ h,
                                      const scalar_t* __restrict__ t, const scalar_t* __restrict__ beta,
                                      scalar_t* __restrict__ out, double* __restrict__ block_sums, int64_t n,
                                      int64_t blocks) {
  const math::LipSwishParams<scalar_t> p = math::lipswish_params(beta[0]);
  double acc = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    scalar_t dh_total = scalar_t(0);
    for (int64_t k = 0; k < blocks; ++k) {
      // the primal co-tangent enters once, with the first tangent block
      scalar_t dh, dt, db;
      math::jacobian_lipswish_backward_element(k == 0 ? grad[i] : scalar_t(0), grad[(k + 1) * n + i], h[i],
                                               t[k * n + i], p.beta, p.dbeta, dh, dt, db);
      dh_total += dh;
      out[(k + 1) * n + i] = dt;
      acc += static_cast<double>(db);
    }
    if (blocks == 0) {
      scalar_t dt, db;
      math::jacobian_lipswish_backward_element(grad[i], scalar_t(0), h[i], scalar_t(0), p.beta, p.dbeta, dh_total,
                                               dt, db);
      acc += static_cast<double>(db);
    }
    out[i] = dh_total;
  }
  acc = block_sum<double, kElementwiseThreads>(acc);
  if (threadIdx.x == 0) {
    block_sums[blockIdx.x] = acc;
  }
}

// Coefficients of up to kSeriesChunk terms, by value.
constexpr int kSeriesChunk = 32;
struct SeriesChunk {
  double logdet[kSeriesChunk];
  double neumann[kSeriesChunk];
  int count;
  bool first;  // the first chunk: set g, w = w~ = eps, logdet = 0
  bool last;   // the last chunk: write w~ and the surrogate
};

// One thread per sample. state holds three (B, D) arrays in the accumulation type: w, scratch, w~.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    jacobian_series_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ bias,
                           const scalar_t* __restrict__ eps, scalar_t* __restrict__ g, acc_t* __restrict__ logdet,
                           acc_t* __restrict__ value, scalar_t* __restrict__ w_tilde, acc_t* __restrict__ state,
                           int64_t batch, int64_t dim, bool neumann, SeriesChunk chunk) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < batch; r += stride) {
    const scalar_t* e = eps + r * dim;
    acc_t* w = state + r * dim;
    acc_t* scratch = state + (batch + r) * dim;
    acc_t* wt = state + (2 * batch + r) * dim;
    const math::StackSample<const scalar_t> stack{z, batch, dim, r};
    if (chunk.first) {
      for (int64_t d = 0; d < dim; ++d) {
        g[r * dim + d] = stack.primal(d) + (bias == nullptr ? scalar_t(0) : bias[d]);
        w[d] = static_cast<acc_t>(e[d]);
        wt[d] = w[d];
      }
      logdet[r] = acc_t(0);
    }
    acc_t ld = logdet[r];
    math::jacobian_series_terms<scalar_t>(dim, stack, e, w, scratch, wt, chunk.logdet, chunk.neumann, chunk.count,
                                          neumann, ld);
    logdet[r] = ld;
    if (chunk.last && neumann) {
      acc_t v = acc_t(0);
      for (int64_t d = 0; d < dim; ++d) {
        const scalar_t rounded = static_cast<scalar_t>(wt[d]);
        w_tilde[r * dim + d] = rounded;
        v += static_cast<acc_t>(rounded) * static_cast<acc_t>(stack.eps_tangent(d));
      }
      value[r] = v;
    }
  }
}

// One thread per sample: the seed of the basic estimator's backward (grad_g, 0 on the eps tangent, dL/dJ).
// state holds 2 (B, terms, D) + (B, D) values in the accumulation type (the powers and v). Coefficients in
// device memory (any number of terms).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads, 1)
    jacobian_series_backward_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ eps,
                                    const double* __restrict__ coeffs, const scalar_t* __restrict__ grad_logdet,
                                    const scalar_t* __restrict__ grad_g, scalar_t* __restrict__ seed,
                                    acc_t* __restrict__ state, int64_t batch, int64_t dim, int64_t terms) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < batch; r += stride) {
    acc_t* w = state + r * terms * dim;
    acc_t* b = state + (batch + r) * terms * dim;
    acc_t* v = state + 2 * batch * terms * dim + r * dim;
    // the seed accumulates in the output's type; the terms themselves in acc_t
    math::jacobian_series_seed<scalar_t>(math::StackSample<const scalar_t>{z, batch, dim, r},
                                         math::StackSample<scalar_t>{seed, batch, dim, r}, eps + r * dim,
                                         grad_g + r * dim, w, b, v, coeffs, terms, static_cast<acc_t>(grad_logdet[r]));
  }
}

// Up to kNormalizeJobs layers per launch, by value; one block per layer.
constexpr int kNormalizeJobs = 16;
template <typename scalar_t>
struct NormalizeJob {
  const scalar_t* weight;
  const scalar_t* u;
  const scalar_t* v;
  const scalar_t* grad;  // backward only
  scalar_t* out;
  scalar_t* scale;   // forward: the layer's scale buffer
  scalar_t* sigma;   // forward: written; backward: read
  int64_t rows;
  int64_t cols;
  scalar_t coeff;
  bool detach_sigma;
};
template <typename scalar_t>
struct NormalizeJobs {
  NormalizeJob<scalar_t> job[kNormalizeJobs];
};

// sigma = u^T W v, then W / max(1, sigma / coeff).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads) lipschitz_normalize_kernel(NormalizeJobs<scalar_t> jobs) {
  const NormalizeJob<scalar_t>& job = jobs.job[blockIdx.x];
  const int64_t n = job.rows * job.cols;
  acc_t acc = acc_t(0);
  for (int64_t i = threadIdx.x; i < n; i += kElementwiseThreads) {
    acc += static_cast<acc_t>(job.u[i / job.cols]) * static_cast<acc_t>(job.weight[i]) *
           static_cast<acc_t>(job.v[i % job.cols]);
  }
  const scalar_t sigma = static_cast<scalar_t>(block_sum<acc_t, kElementwiseThreads>(acc));
  const scalar_t factor = math::normalization_factor(sigma, job.coeff);
  for (int64_t i = threadIdx.x; i < n; i += kElementwiseThreads) {
    job.out[i] = job.weight[i] / factor;
  }
  if (threadIdx.x == 0) {
    *job.sigma = sigma;
    *job.scale = sigma;
  }
}

// dL/dW = G / factor + c u v^T, c = -<G, W> / factor^2 * dfactor/dsigma (0 with detach_sigma).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    lipschitz_normalize_backward_kernel(NormalizeJobs<scalar_t> jobs) {
  const NormalizeJob<scalar_t>& job = jobs.job[blockIdx.x];
  const int64_t n = job.rows * job.cols;
  acc_t acc = acc_t(0);
  for (int64_t i = threadIdx.x; i < n; i += kElementwiseThreads) {
    acc += static_cast<acc_t>(job.grad[i]) * static_cast<acc_t>(job.weight[i]);
  }
  const scalar_t gw = static_cast<scalar_t>(block_sum<acc_t, kElementwiseThreads>(acc));
  const scalar_t sigma = *job.sigma;
  const scalar_t factor = math::normalization_factor(sigma, job.coeff);
  const scalar_t slope = job.detach_sigma ? scalar_t(0) : math::normalization_slope(sigma, job.coeff);
  const scalar_t c = -gw / (factor * factor) * slope;
  for (int64_t i = threadIdx.x; i < n; i += kElementwiseThreads) {
    job.out[i] = job.grad[i] / factor + c * job.u[i / job.cols] * job.v[i % job.cols];
  }
}

// The launchers. Every pointer is device memory; bias may be null.
inline int grid_for(int64_t n, int sm_count) {
  const int64_t blocks = (n + kElementwiseThreads - 1) / kElementwiseThreads;
  const int64_t cap = static_cast<int64_t>(sm_count) * 4;
  return static_cast<int>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

template <typename scalar_t>
void launch_jacobian_lipswish(int sm_count, const scalar_t* z, const scalar_t* bias, const scalar_t* beta, scalar_t* h,
                              scalar_t* a, scalar_t* kept_a, scalar_t* kept_t, int64_t batch, int64_t width,
                              int64_t blocks, cudaStream_t stream) {
  const auto kernel = &jacobian_lipswish_kernel<scalar_t>;
  RESFLOW_LAUNCH(kernel, grid_for(batch * width, sm_count), kElementwiseThreads, 0, stream)(
      z, bias, beta, h, a, kept_a, kept_t, batch, width, blocks);
}

// block_sums holds jacobian_backward_blocks(n, sm_count) doubles.
inline int jacobian_backward_blocks(int64_t n, int sm_count) { return grid_for(n, sm_count); }

template <typename scalar_t>
void launch_jacobian_lipswish_backward(int sm_count, const scalar_t* grad, const scalar_t* h, const scalar_t* t,
                                       const scalar_t* beta, scalar_t* out, double* block_sums, scalar_t* grad_beta,
                                       int64_t n, int64_t tangent_blocks, cudaStream_t stream) {
  const int blocks = jacobian_backward_blocks(n, sm_count);
  const auto kernel = &jacobian_lipswish_backward_kernel<scalar_t>;
  RESFLOW_LAUNCH(kernel, blocks, kElementwiseThreads, 0, stream)(grad, h, t, beta, out, block_sums, n,
                                                                 tangent_blocks);
  const auto finish = &finish_sum_kernel<scalar_t>;
  RESFLOW_LAUNCH(finish, 1, kElementwiseThreads, 0, stream)(block_sums, blocks, grad_beta);
}

// One launch per kSeriesChunk terms (at least one).
template <typename scalar_t, typename acc_t>
void launch_jacobian_series(int sm_count, const scalar_t* z, const scalar_t* bias, const scalar_t* eps, scalar_t* g,
                            acc_t* logdet, acc_t* value, scalar_t* w_tilde, acc_t* state, int64_t batch, int64_t dim,
                            const double* logdet_coeffs, const double* neumann_coeffs, int64_t terms,
                            cudaStream_t stream) {
  const bool neumann = neumann_coeffs != nullptr;
  int64_t k = 0;
  do {
    SeriesChunk chunk{};
    chunk.count = static_cast<int>(terms - k < kSeriesChunk ? terms - k : kSeriesChunk);
    for (int j = 0; j < chunk.count; ++j) {
      chunk.logdet[j] = logdet_coeffs[k + j];
      chunk.neumann[j] = neumann ? neumann_coeffs[k + j] : 0.0;
    }
    chunk.first = k == 0;
    chunk.last = k + chunk.count >= terms;
    const auto kernel = &jacobian_series_kernel<scalar_t, acc_t>;
    RESFLOW_LAUNCH(kernel, grid_for(batch, sm_count), kElementwiseThreads, 0, stream)(
        z, bias, eps, g, logdet, value, w_tilde, state, batch, dim, neumann, chunk);
    k += chunk.count;
  } while (k < terms);
}

template <typename scalar_t, typename acc_t>
void launch_jacobian_series_backward(int sm_count, const scalar_t* z, const scalar_t* eps, const double* coeffs,
                                     const scalar_t* grad_logdet, const scalar_t* grad_g, scalar_t* seed,
                                     acc_t* state, int64_t batch, int64_t dim, int64_t terms, cudaStream_t stream) {
  const auto kernel = &jacobian_series_backward_kernel<scalar_t, acc_t>;
  RESFLOW_LAUNCH(kernel, grid_for(batch, sm_count), kElementwiseThreads, 0, stream)(
      z, eps, coeffs, grad_logdet, grad_g, seed, state, batch, dim, terms);
}

// jobs[0..count): one launch per kNormalizeJobs layers.
template <typename scalar_t, typename acc_t>
void launch_lipschitz_normalize(const NormalizeJob<scalar_t>* jobs, int64_t count, bool backward, cudaStream_t stream) {
  for (int64_t first = 0; first < count; first += kNormalizeJobs) {
    NormalizeJobs<scalar_t> batch{};
    const int64_t n = count - first < kNormalizeJobs ? count - first : kNormalizeJobs;
    for (int64_t j = 0; j < n; ++j) {
      batch.job[j] = jobs[first + j];
    }
    if (backward) {
      const auto kernel = &lipschitz_normalize_backward_kernel<scalar_t, acc_t>;
      RESFLOW_LAUNCH(kernel, static_cast<int>(n), kElementwiseThreads, 0, stream)(batch);
    } else {
      const auto kernel = &lipschitz_normalize_kernel<scalar_t, acc_t>;
      RESFLOW_LAUNCH(kernel, static_cast<int>(n), kElementwiseThreads, 0, stream)(batch);
    }
  }
}

}  // namespace resflow_cuda::cuda
