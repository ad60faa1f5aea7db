// Building blocks of the CUDA kernels, shared by every op: vector packs for 128-bit global
// accesses, the grid-stride loop over packs, a block-wide sum, the deterministic second pass
// of a grid-wide sum, and the launch plan of elementwise kernels. Torch-free and emulatable:
// the .cu bindings and the emulated test extension both call the same plan and launch code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "resflow/cuda_compat.h"

namespace resflow_cuda::cuda {

constexpr int kWarpSize = 32;
constexpr int kElementwiseThreads = 256;
// Resident blocks per SM an elementwise kernel is compiled for (__launch_bounds__' second
// argument): float32, 6 x 256 threads = 75 % of an SM's 2048 (at most 40 registers a thread);
// double and the 8-wide half packs need more registers, 4 blocks = 50 % (at most 64) keeps them
// from spilling. The elementwise plan launches up to this many blocks per SM: every block the
// SM can hold is resident, and more would only add grid-stride tails.
template <typename scalar_t>
constexpr int elementwise_min_blocks() {
  return sizeof(scalar_t) == 4 ? 6 : 4;
}
// Largest vector access, in bytes (LDG.E.128 / STG.E.128).
constexpr int kMaxAccessBytes = 16;
// Dynamic shared memory a block may use without opting in, on every supported GPU.
constexpr size_t kDefaultMaxSharedBytes = 48 * 1024;

// VEC consecutive elements, aligned so that a whole pack is one vector load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Loads elements [i, i + count) of p, count <= VEC; a full pack is one aligned vector load.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ p, int64_t i, int count) {
  Pack<T, VEC> out;
  if (count == VEC) {
    out = *reinterpret_cast<const Pack<T, VEC>*>(p + i);
  } else {
    // Unrolled, so that every out.v[j] is a register: a loop indexed at run time would put the
    // pack in local memory (the kernel report's budget).
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      out.v[j] = j < count ? p[i + j] : T(0);
    }
  }
  return out;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t i, int count, const Pack<T, VEC>& in) {
  if (count == VEC) {
    *reinterpret_cast<Pack<T, VEC>*>(p + i) = in;
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j < count) {
        p[i + j] = in.v[j];
      }
    }
  }
}

// Calls f(first_element, count) for every pack of VEC elements of [0, n), grid-stride; only the
// last pack can be partial (count = n % VEC).
template <int VEC, typename F>
__device__ __forceinline__ void for_each_pack(int64_t n, const F& f) {
  const int64_t packs = (n + VEC - 1) / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < packs; k += stride) {
    const int64_t first = k * VEC;
    const int64_t left = n - first;
    f(first, left < VEC ? static_cast<int>(left) : VEC);
  }
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// max that propagates NaN (as torch.max does).
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a != a ? a : (b != b ? b : (a < b ? b : a));
  }
};

// Reduces v over a warp with op; the result is valid in lane 0. All 32 lanes must call it.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Reduces v over a block of exactly BLOCK threads (a multiple of 32) and returns the result to
// every thread. Every thread of the block must call it (it contains __syncthreads); calls may
// follow each other directly.
template <typename T, int BLOCK, typename Op>
__device__ __forceinline__ T block_all_reduce(T v, Op op, T identity) {
  static_assert(BLOCK % kWarpSize == 0 && BLOCK <= kWarpSize * kWarpSize, "BLOCK must be 32..1024, a multiple of 32");
  RESFLOW_SHARED_ARRAY(T, warp_values, BLOCK / kWarpSize);
  RESFLOW_SHARED(T, result);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_reduce(v, op);
  if (lane == 0) {
    warp_values[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    v = warp_reduce(lane < BLOCK / kWarpSize ? warp_values[lane] : identity, op);
    if (lane == 0) {
      result = v;
    }
  }
  __syncthreads();
  const T out = result;
  __syncthreads();  // the next call may overwrite warp_values and result
  return out;
}

template <typename T, int BLOCK>
__device__ __forceinline__ T block_sum(T v) {
  return block_all_reduce<T, BLOCK>(v, SumOp{}, T(0));
}

// Second pass of a grid-wide sum: one block adds the per-block partial sums in a fixed order and
// writes the total to out[0] in out's type. Deterministic for a given grid (no atomics).
template <typename out_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    finish_sum_kernel(const double* __restrict__ partials, int count, out_t* __restrict__ out) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += kElementwiseThreads) {
    acc += partials[i];
  }
  acc = block_sum<double, kElementwiseThreads>(acc);
  if (threadIdx.x == 0) {
    out[0] = static_cast<out_t>(acc);
  }
}

// How an elementwise kernel over n elements is launched: VEC elements per thread step (16-byte
// accesses when every operand is 16-byte aligned, else 1), 256 threads, and enough blocks to
// cover the packs once, capped at elementwise_min_blocks<scalar_t>() per SM (grid-stride beyond).
struct ElementwisePlan {
  int vec;
  int blocks;
  int threads;
};

inline bool aligned_for_vectors(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % kMaxAccessBytes == 0;
}

template <typename scalar_t>
ElementwisePlan plan_elementwise(int64_t n, int sm_count, bool all_aligned) {
  const int vec = all_aligned ? kMaxAccessBytes / static_cast<int>(sizeof(scalar_t)) : 1;
  const int64_t packs = (n + vec - 1) / vec;
  int64_t blocks = (packs + kElementwiseThreads - 1) / kElementwiseThreads;
  const int64_t cap = static_cast<int64_t>(sm_count) * elementwise_min_blocks<scalar_t>();
  blocks = blocks < cap ? blocks : cap;
  return {vec, static_cast<int>(blocks < 1 ? 1 : blocks), kElementwiseThreads};
}

}  // namespace resflow_cuda::cuda
