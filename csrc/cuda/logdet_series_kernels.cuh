// The fused log-det series step on CUDA (resflow/series_math.h, shared with the CPU kernels):
// logdet[r] += logdet_coeff·<w_r, eps_r> and neumann += neumann_coeff·w for every sample r of
// `cols` consecutive elements. One block per sample (grid-stride over samples): the block's
// threads stride over the sample in packs and reduce with block_sum, so each sum has a fixed
// order (deterministic, no atomics). Torch-free and emulatable; logdet_series_cuda.cu binds
// tensors to the launcher and the emulated test extension runs the same launcher on CPU memory.
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"
#include "resflow/series_math.h"

namespace resflow_cuda::cuda {

constexpr int kSeriesThreads = 256;

template <typename scalar_t, typename acc_t, int VEC, bool NEUMANN>
__global__ void __launch_bounds__(kSeriesThreads)
    logdet_series_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ eps,
                         scalar_t* __restrict__ neumann, acc_t* __restrict__ logdet, int64_t logdet_stride,
                         int64_t rows, int64_t cols, acc_t logdet_coeff, acc_t neumann_coeff) {
  const int64_t packs = (cols + VEC - 1) / VEC;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t base = r * cols;
    acc_t acc = acc_t(0);
    for (int64_t k = threadIdx.x; k < packs; k += kSeriesThreads) {
      const int64_t i = base + k * VEC;
      const int64_t left = cols - k * VEC;
      const int count = left < VEC ? static_cast<int>(left) : VEC;
      const Pack<scalar_t, VEC> wv = load_pack<scalar_t, VEC>(w, i, count);
      const Pack<scalar_t, VEC> ev = load_pack<scalar_t, VEC>(eps, i, count);
      Pack<scalar_t, VEC> nv;
      if (NEUMANN) {
        nv = load_pack<scalar_t, VEC>(neumann, i, count);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t wj = static_cast<acc_t>(wv.v[j]);
        acc += math::series_product(wj, static_cast<acc_t>(ev.v[j]));
        if (NEUMANN) {
          nv.v[j] = static_cast<scalar_t>(math::neumann_update(static_cast<acc_t>(nv.v[j]), wj, neumann_coeff));
        }
      }
      if (NEUMANN) {
        store_pack<scalar_t, VEC>(neumann, i, count, nv);
      }
    }
    acc = block_sum<acc_t, kSeriesThreads>(acc);
    if (threadIdx.x == 0) {
      logdet[r * logdet_stride] += logdet_coeff * acc;
    }
  }
}

// Blocks: one per sample up to kElementwiseBlocksPerSm per SM; 16-byte packs when every base
// pointer and every sample's start (cols elements apart) are 16-byte aligned.
struct SeriesPlan {
  int vec;
  int blocks;
};

template <typename scalar_t>
SeriesPlan plan_series(int64_t rows, int64_t cols, int sm_count, bool bases_aligned) {
  const bool rows_aligned = (cols * static_cast<int64_t>(sizeof(scalar_t))) % kMaxAccessBytes == 0;
  const int vec = bases_aligned && rows_aligned ? kMaxAccessBytes / static_cast<int>(sizeof(scalar_t)) : 1;
  const int64_t cap = static_cast<int64_t>(sm_count) * kElementwiseBlocksPerSm;
  const int64_t blocks = rows < cap ? rows : cap;
  return {vec, static_cast<int>(blocks < 1 ? 1 : blocks)};
}

// neumann may be null (no Neumann vector). Every pointer is device memory.
template <typename scalar_t, typename acc_t>
void launch_logdet_series(const SeriesPlan& plan, const scalar_t* w, const scalar_t* eps, scalar_t* neumann,
                          acc_t* logdet, int64_t logdet_stride, int64_t rows, int64_t cols, acc_t logdet_coeff,
                          acc_t neumann_coeff, cudaStream_t stream) {
  constexpr int kWide = kMaxAccessBytes / static_cast<int>(sizeof(scalar_t));
  const auto launch = [&](auto kernel) {
    RESFLOW_LAUNCH(kernel, plan.blocks, kSeriesThreads, 0, stream)(w, eps, neumann, logdet, logdet_stride, rows, cols,
                                                                   logdet_coeff, neumann_coeff);
  };
  if (plan.vec == kWide) {
    if (neumann == nullptr) {
      launch(&logdet_series_kernel<scalar_t, acc_t, kWide, false>);
    } else {
      launch(&logdet_series_kernel<scalar_t, acc_t, kWide, true>);
    }
  } else if (neumann == nullptr) {
    launch(&logdet_series_kernel<scalar_t, acc_t, 1, false>);
  } else {
    launch(&logdet_series_kernel<scalar_t, acc_t, 1, true>);
  }
}

}  // namespace resflow_cuda::cuda
