// Test-only kernels that probe the emulator itself: intrinsic semantics, the synchronisation
// errors it must report, and a planted race for the sanitizer test. Not CUDA kernels of the
// library (those live in csrc/cuda); compiled only into the emulated test extension.
#pragma once

#include "resflow/cuda_compat.h"

namespace resflow_emu_probe {

// Each thread writes 10 results of warp and block intrinsics into out[tid * 10 ...].
static __global__ void intrinsics_kernel(int* out, int width) {
  const int t = threadIdx.x;
  const int lane = t % warpSize;
  int* o = out + t * 10;
  o[0] = __shfl_sync(0xffffffffu, lane * 10, 3, width);
  o[1] = __shfl_up_sync(0xffffffffu, lane, 2, width);
  o[2] = __shfl_down_sync(0xffffffffu, lane, 3, width);
  o[3] = __shfl_xor_sync(0xffffffffu, lane, 5, width);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[5] = __any_sync(0xffffffffu, lane == 7);
  o[6] = __all_sync(0xffffffffu, lane < 31);
  o[7] = __syncthreads_count(t % 2);
  o[8] = __syncthreads_and(t >= 0) + 2 * __syncthreads_or(t == 5);
  // A half-warp collective: lanes 0-15 and 16-31 each sum their own lane ids.
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  int v = lane;
  for (int offset = 8; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(half, v, offset, 16);
  }
  o[9] = v;
}

// Every atomic on the same addresses from all threads of all blocks.
static __global__ void atomics_kernel(int* ints, float* floats, double* doubles) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(&ints[0], 1);
  atomicMax(&ints[1], t);
  atomicMin(&ints[2], -t);
  atomicSub(&ints[3], 2);
  atomicOr(&ints[4], 1 << (t % 31));
  atomicExch(&ints[5], 7);
  int old = atomicAdd(&ints[6], 0);  // an atomic read: a plain one races with the CAS of other threads
  int assumed;
  do {  // the compare-and-swap loop
    assumed = old;
    old = atomicCAS(&ints[6], assumed, assumed + 3);
  } while (old != assumed);
  atomicAdd(&floats[0], 0.5f);
  atomicAdd(&doubles[0], 0.25);
}

// Dynamic shared memory: poisoned (NaN) at the start of every block, then shared by the block.
static __global__ void dynamic_shared_kernel(int* out) {
  RESFLOW_DYNAMIC_SHARED(float, sm);
  const unsigned t = threadIdx.x;
  const int poisoned = sm[t] != sm[t];
  __syncthreads();
  sm[t] = static_cast<float>(t);
  __syncthreads();
  const unsigned mirror = blockDim.x - 1 - t;
  out[blockIdx.x * blockDim.x + t] = poisoned + (sm[mirror] == static_cast<float>(mirror) ? 2 : 0);
}

// Threads of one block wait at two different barriers.
// 1 KiB of static shared memory: launched with more than 47 KiB of dynamic shared memory, the
// block asks for more than the 48 KiB a GPU grants without opting in.
static __global__ void static_shared_kernel(int* out) {
  RESFLOW_SHARED_ARRAY(int, tile, 256);
  tile[threadIdx.x % 256] = static_cast<int>(threadIdx.x);  // blockDim.x <= 256
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = tile[(threadIdx.x + 1) % blockDim.x];
}

static __global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 40) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Half of warp 0 shuffles with a full mask while its other half waits at a barrier: on a GPU
// the block hangs.
static __global__ void warp_facing_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
  } else {
    __syncthreads();
  }
}

// A full mask in a block of 40 threads: the second warp has no lanes 8-31.
static __global__ void absent_lane_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Lane 0 leaves early; the others then name it in a collective.
static __global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 0) {
    return;
  }
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Reverses x within each block through shared memory. With WITH_BARRIER false the
// __syncthreads between the shared write and the read of another thread's element is missing:
// the planted race that ThreadSanitizer must report and that gives wrong values under the
// emulator (warp 0 runs ahead and reads elements later warps have not written yet).
template <bool WITH_BARRIER>
__global__ void shared_reverse_kernel(const float* x, float* y) {
  RESFLOW_SHARED_ARRAY(float, tile, 128);
  const int t = threadIdx.x;
  tile[t] = x[blockIdx.x * 128 + t];
  if (WITH_BARRIER) {
    __syncthreads();
  }
  y[blockIdx.x * 128 + t] = tile[127 - t];
}

}  // namespace resflow_emu_probe
