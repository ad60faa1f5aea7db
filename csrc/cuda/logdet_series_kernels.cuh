// The fused log-det series step on CUDA (resflow/series_math.h, shared with the CPU kernels):
// logdet[r] += logdet_coeff·<w_r, eps_r> and neumann += neumann_coeff·w for every sample r of
// `cols` consecutive elements, with scale: w *= scale first (written back). A block per sample, or a
// warp per sample for narrow samples (grid-stride over samples): the threads stride over the sample in
// packs and reduce with block_sum or warp shuffles, so each sum has a fixed order (deterministic, no
// atomics). Torch-free and emulatable; logdet_series_cuda.cu binds tensors to the launcher and the
// emulated test extension runs the same launcher on CPU memory.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernel_utils.cuh"
#include "resflow/series_math.h"

namespace resflow_cuda::cuda {

constexpr int kSeriesThreads = 256;
// Rows of at most this many packs go one warp per row (eight rows per block), so that a narrow
// sample (the toy flows' two values) does not leave 254 of a block's 256 threads idle; wider rows
// get a whole block each.
constexpr int64_t kWarpRowMaxPacks = 4 * kWarpSize;
// Resident blocks per SM the series plan aims for (the kernel's registers allow more; beyond the
// rows there is nothing to spread).
constexpr int kSeriesBlocksPerSm = 4;

// The `lane`-th of LANES threads walks row r in packs: returns its share of <w_r, eps_r> and
// applies the Neumann update (and, with SCALE, w *= scale) to the packs it visits.
template <typename scalar_t, typename acc_t, int VEC, bool NEUMANN, bool SCALE, int LANES>
__device__ __forceinline__ acc_t series_row_share(scalar_t* __restrict__ w, const scalar_t* __restrict__ eps,
                                                  const scalar_t* __restrict__ scale, scalar_t* __restrict__ neumann,
                                                  int64_t r, int64_t cols, int lane, acc_t neumann_coeff) {
  const int64_t packs = (cols + VEC - 1) / VEC;
  const int64_t base = r * cols;
  acc_t acc = acc_t(0);
  for (int64_t k = lane; k < packs; k += LANES) {
    const int64_t i = base + k * VEC;
    const int64_t left = cols - k * VEC;
    const int count = left < VEC ? static_cast<int>(left) : VEC;
    Pack<scalar_t, VEC> wv = load_pack<scalar_t, VEC>(w, i, count);
    const Pack<scalar_t, VEC> ev = load_pack<scalar_t, VEC>(eps, i, count);
    Pack<scalar_t, VEC> nv, sv;
    if (NEUMANN) {
      nv = load_pack<scalar_t, VEC>(neumann, i, count);
    }
    if (SCALE) {
      sv = load_pack<scalar_t, VEC>(scale, i, count);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t wj = static_cast<acc_t>(wv.v[j]);
      if (SCALE) {
        wj = math::scaled(wj, static_cast<acc_t>(sv.v[j]));
        wv.v[j] = static_cast<scalar_t>(wj);
      }
      acc += math::series_product(wj, static_cast<acc_t>(ev.v[j]));
      if (NEUMANN) {
        nv.v[j] = static_cast<scalar_t>(math::neumann_update(static_cast<acc_t>(nv.v[j]), wj, neumann_coeff));
      }
    }
    if (SCALE) {
      store_pack<scalar_t, VEC>(w, i, count, wv);
    }
    if (NEUMANN) {
      store_pack<scalar_t, VEC>(neumann, i, count, nv);
    }
  }
  return acc;
}

// WARP_ROWS: each warp owns one row at a time (grid-stride over rows, eight per block step) and
// reduces with shuffles; otherwise each block owns one row and reduces with block_sum. Either way
// a row's sum has a fixed order (deterministic, no atomics).
template <typename scalar_t, typename acc_t, int VEC, bool NEUMANN, bool SCALE, bool WARP_ROWS>
__global__ void __launch_bounds__(kSeriesThreads)
    logdet_series_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ eps,
                         const scalar_t* __restrict__ scale, scalar_t* __restrict__ neumann,
                         acc_t* __restrict__ logdet, int64_t logdet_stride, int64_t rows, int64_t cols,
                         acc_t logdet_coeff, acc_t neumann_coeff) {
  if (WARP_ROWS) {
    constexpr int kRowsPerBlock = kSeriesThreads / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const int64_t step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
    // The loop bound depends on the warp only, so every lane of a warp takes the shuffles together.
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; r < rows; r += step) {
      acc_t acc = series_row_share<scalar_t, acc_t, VEC, NEUMANN, SCALE, kWarpSize>(w, eps, scale, neumann, r, cols,
                                                                                    lane, neumann_coeff);
      acc = warp_reduce(acc, SumOp{});
      if (lane == 0) {
        logdet[r * logdet_stride] += logdet_coeff * acc;
      }
    }
  } else {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
      acc_t acc = series_row_share<scalar_t, acc_t, VEC, NEUMANN, SCALE, kSeriesThreads>(
          w, eps, scale, neumann, r, cols, threadIdx.x, neumann_coeff);
      acc = block_sum<acc_t, kSeriesThreads>(acc);
      if (threadIdx.x == 0) {
        logdet[r * logdet_stride] += logdet_coeff * acc;
      }
    }
  }
}

// A warp per row for rows of at most kWarpRowMaxPacks packs, else a block per row; blocks enough
// for every row once, up to kSeriesBlocksPerSm per SM; 16-byte packs when every base pointer and
// every sample's start (cols elements apart) are 16-byte aligned.
struct SeriesPlan {
  int vec;
  int blocks;
  bool warp_rows;
};

template <typename scalar_t>
SeriesPlan plan_series(int64_t rows, int64_t cols, int sm_count, bool bases_aligned) {
  const bool rows_aligned = (cols * static_cast<int64_t>(sizeof(scalar_t))) % kMaxAccessBytes == 0;
  const int vec = bases_aligned && rows_aligned ? kMaxAccessBytes / static_cast<int>(sizeof(scalar_t)) : 1;
  const bool warp_rows = (cols + vec - 1) / vec <= kWarpRowMaxPacks;
  const int64_t rows_per_block = warp_rows ? kSeriesThreads / kWarpSize : 1;
  const int64_t needed = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t cap = static_cast<int64_t>(sm_count) * kSeriesBlocksPerSm;
  const int64_t blocks = needed < cap ? needed : cap;
  return {vec, static_cast<int>(blocks < 1 ? 1 : blocks), warp_rows};
}

// neumann may be null (no Neumann vector), scale null (w only read). Every pointer is device memory.
template <typename scalar_t, typename acc_t>
void launch_logdet_series(const SeriesPlan& plan, scalar_t* w, const scalar_t* eps, const scalar_t* scale,
                          scalar_t* neumann, acc_t* logdet, int64_t logdet_stride, int64_t rows, int64_t cols,
                          acc_t logdet_coeff, acc_t neumann_coeff, cudaStream_t stream) {
  constexpr int kWide = kMaxAccessBytes / static_cast<int>(sizeof(scalar_t));
  const auto launch = [&](auto kernel) {
    RESFLOW_LAUNCH(kernel, plan.blocks, kSeriesThreads, 0, stream)(w, eps, scale, neumann, logdet, logdet_stride, rows,
                                                                   cols, logdet_coeff, neumann_coeff);
  };
  // Sixteen instantiations: pack width x Neumann vector x scale x row ownership.
  const auto by_rows = [&](auto vec, auto with_neumann, auto with_scale) {
    constexpr int V = decltype(vec)::value;
    constexpr bool N = decltype(with_neumann)::value;
    constexpr bool S = decltype(with_scale)::value;
    if (plan.warp_rows) {
      launch(&logdet_series_kernel<scalar_t, acc_t, V, N, S, true>);
    } else {
      launch(&logdet_series_kernel<scalar_t, acc_t, V, N, S, false>);
    }
  };
  const auto by_scale = [&](auto vec, auto with_neumann) {
    if (scale == nullptr) {
      by_rows(vec, with_neumann, std::false_type{});
    } else {
      by_rows(vec, with_neumann, std::true_type{});
    }
  };
  const auto by_neumann = [&](auto vec) {
    if (neumann == nullptr) {
      by_scale(vec, std::false_type{});
    } else {
      by_scale(vec, std::true_type{});
    }
  };
  if (plan.vec == kWide) {
    by_neumann(std::integral_constant<int, kWide>{});
  } else {
    by_neumann(std::integral_constant<int, 1>{});
  }
}

}  // namespace resflow_cuda::cuda
