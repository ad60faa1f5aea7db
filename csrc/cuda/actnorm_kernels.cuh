// actnorm and actnorm_backward on CUDA (resflow/actnorm_math.h, shared with the CPU kernels).
// Forward: one pass y = (x + b) e^w over the B·C rows of S positions (a row per min(S, 256) threads,
// grid-stride over rows), and in the same launch, for the first B threads, the log-density logp + sign · S · Σ w. Backward: one block per
// channel walks that channel's B·S elements, writes grad_x = g e^w and reduces Σ g and Σ g y in double with
// block_sum (a fixed order: deterministic, no atomics); every block also sums grad_logp (B values).
// A channel's B·S values take one block: meant for ActNorm's layers up to the size the layers send here
// (nn/flows.py: _ACTNORM_CUDA_MAX per channel). Torch-free and emulatable; actnorm_binding.h binds tensors to the
// launchers.
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"
#include "resflow/actnorm_math.h"

namespace resflow_cuda::cuda {

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    actnorm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                   const scalar_t* __restrict__ bias, const scalar_t* __restrict__ logp, scalar_t* __restrict__ y,
                   scalar_t* __restrict__ logp_out, int64_t batch, int64_t channels, int64_t positions,
                   acc_t signed_positions) {
  // Rows of S positions, one channel each; a row takes min(S, 256) lanes of a block, a block 256 / lanes rows
  // at a time (grid-stride). The channel follows the row by additions: no index is divided per element.
  if (positions > 0) {
    const int lanes = positions < kElementwiseThreads ? static_cast<int>(positions) : kElementwiseThreads;
    const int per_block = kElementwiseThreads / lanes;
    const int slot = static_cast<int>(threadIdx.x) / lanes;
    const int lane = static_cast<int>(threadIdx.x) % lanes;
    const int64_t step = static_cast<int64_t>(gridDim.x) * per_block;
    int64_t row = static_cast<int64_t>(blockIdx.x) * per_block + slot;
    if (slot < per_block && row < batch * channels) {
      int64_t c = row % channels;
      const int64_t c_step = step % channels;
      for (; row < batch * channels; row += step) {
        const acc_t scale = math::actnorm_scale(static_cast<acc_t>(weight[c]));
        const acc_t shift = static_cast<acc_t>(bias[c]);
        for (int64_t i = row * positions + lane; i < (row + 1) * positions; i += lanes) {
          y[i] = static_cast<scalar_t>(math::actnorm_value(static_cast<acc_t>(x[i]), shift, scale));
        }
        c += c_step;
        c = c >= channels ? c - channels : c;
      }
    }
  }
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (logp == nullptr || first >= batch) {
    return;
  }
  acc_t weight_sum = acc_t(0);  // the same order as the CPU op's
  for (int64_t c = 0; c < channels; ++c) {
    weight_sum += static_cast<acc_t>(weight[c]);
  }
  for (int64_t r = first; r < batch; r += stride) {
    logp_out[r] = static_cast<scalar_t>(math::actnorm_logp(static_cast<acc_t>(logp[r]), weight_sum, signed_positions));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    actnorm_backward_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ grad_logp,
                            const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                            const scalar_t* __restrict__ bias, scalar_t* __restrict__ grad_x,
                            scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias, int64_t batch,
                            int64_t channels, int64_t positions, double signed_positions) {
  const int64_t c = blockIdx.x;
  const acc_t scale = math::actnorm_scale(static_cast<acc_t>(weight[c]));
  const acc_t shift = static_cast<acc_t>(bias[c]);
  double sum_g = 0.0, sum_gy = 0.0, sum_logp = 0.0;
  // The thread's elements j = threadIdx.x + 256 i of the channel's B·S, as (sample, position) pairs that step
  // by additions: no index is divided per element.
  const int64_t s_step = positions > 0 ? kElementwiseThreads % positions : 0;
  const int64_t b_step = positions > 0 ? kElementwiseThreads / positions : 0;
  int64_t b = positions > 0 ? threadIdx.x / positions : batch;
  int64_t s = positions > 0 ? threadIdx.x % positions : 0;
  for (; b < batch; b += b_step) {
    const int64_t k = (b * channels + c) * positions + s;
    s += s_step;
    if (s >= positions) {
      s -= positions;
      b += 1;
    }
    const acc_t g = static_cast<acc_t>(grad_y[k]);
    grad_x[k] = static_cast<scalar_t>(g * scale);
    sum_g += static_cast<double>(g);
    sum_gy += static_cast<double>(g) * static_cast<double>(math::actnorm_value(static_cast<acc_t>(x[k]), shift, scale));
  }
  if (grad_logp != nullptr) {
    for (int64_t r = threadIdx.x; r < batch; r += kElementwiseThreads) {
      sum_logp += static_cast<double>(grad_logp[r]);
    }
  }
  sum_g = block_sum<double, kElementwiseThreads>(sum_g);
  sum_gy = block_sum<double, kElementwiseThreads>(sum_gy);
  sum_logp = block_sum<double, kElementwiseThreads>(sum_logp);
  if (threadIdx.x == 0) {
    grad_bias[c] = static_cast<scalar_t>(sum_g * static_cast<double>(scale));
    grad_weight[c] = static_cast<scalar_t>(sum_gy + signed_positions * sum_logp);
  }
}

// logp and logp_out null without a log-density; blocks enough for every row (or every sample's log-density)
// once, at most elementwise_min_blocks per SM. Every pointer is device memory.
template <typename scalar_t, typename acc_t>
void launch_actnorm(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, const scalar_t* logp,
                    scalar_t* y, scalar_t* logp_out, int64_t batch, int64_t channels, int64_t positions,
                    acc_t signed_positions, int sm_count, cudaStream_t stream) {
  const int64_t lanes = positions < kElementwiseThreads ? (positions > 0 ? positions : 1) : kElementwiseThreads;
  const int64_t per_block = kElementwiseThreads / lanes;
  const int64_t for_rows = (batch * channels + per_block - 1) / per_block;
  const int64_t for_logp = (batch + kElementwiseThreads - 1) / kElementwiseThreads;
  const int64_t needed = for_rows > for_logp ? for_rows : for_logp;
  const int64_t cap = static_cast<int64_t>(sm_count) * elementwise_min_blocks<scalar_t>();
  const int64_t blocks = needed < cap ? needed : cap;
  const auto kernel = &actnorm_kernel<scalar_t, acc_t>;
  RESFLOW_LAUNCH(kernel, static_cast<int>(blocks < 1 ? 1 : blocks), kElementwiseThreads, 0, stream)(
      x, weight, bias, logp, y, logp_out, batch, channels, positions, signed_positions);
}

// One block per channel (channels >= 1); grad_logp null without a log-density.
template <typename scalar_t, typename acc_t>
void launch_actnorm_backward(const scalar_t* grad_y, const scalar_t* grad_logp, const scalar_t* x,
                             const scalar_t* weight, const scalar_t* bias, scalar_t* grad_x, scalar_t* grad_weight,
                             scalar_t* grad_bias, int64_t batch, int64_t channels, int64_t positions,
                             double signed_positions, cudaStream_t stream) {
  const auto kernel = &actnorm_backward_kernel<scalar_t, acc_t>;
  RESFLOW_LAUNCH(kernel, static_cast<unsigned>(channels), kElementwiseThreads, 0, stream)(
      grad_y, grad_logp, x, weight, bias, grad_x, grad_weight, grad_bias, batch, channels, positions,
      signed_positions);
}

}  // namespace resflow_cuda::cuda
