// Power iteration for spectral and induced p->q norms of dense matrices, CUDA: the whole loop in
// one launch, one block per matrix of a batch (equal shapes, strided) or of a list (any shapes:
// every layer of a model in one launch). u, v and the raw matrix-vector product live in
// dynamic shared memory (compute type); W is read from global memory twice per iteration with
// coalesced loads (a warp per row for W v, a thread per column for W^T u). The dual maps
// (resflow/power_iteration_math.h) and the reference's stopping test run in the block, so the
// host never synchronises inside the loop. Matrices too large for shared memory, and
// convolutions, apply the operator with ATen and the dual maps with the grid-wide kernels at the
// end of this file (power_iteration_binding.h). Torch-free and emulatable.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernel_utils.cuh"
#include "resflow/power_iteration_math.h"

namespace resflow_cuda::cuda {

constexpr int kPowerIterationThreads = 256;

// Is (b, ib) a better argmax candidate than (a, ia)? Larger value, NaN above all (as in
// torch.argmax), then the smaller index; index -1 marks "no candidate".
template <typename acc_t>
__device__ __forceinline__ bool better_candidate(acc_t a, int64_t ia, acc_t b, int64_t ib) {
  if (ib < 0) return false;
  if (ia < 0) return true;
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return b > a;
  return ib < ia;
}

template <typename acc_t>
__device__ __forceinline__ void take_if_better(acc_t& best, int64_t& best_index, acc_t value, int64_t index) {
  if (better_candidate(best, best_index, value, index)) {
    best = value;
    best_index = index;
  }
}

// Reduces (value, index) candidates over a warp; the winner ends in lane 0.
template <typename acc_t>
__device__ __forceinline__ void warp_argmax(acc_t& best, int64_t& best_index) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const acc_t other = __shfl_down_sync(0xffffffffu, best, offset);
    const long long other_index = __shfl_down_sync(0xffffffffu, static_cast<long long>(best_index), offset);
    take_if_better(best, best_index, other, static_cast<int64_t>(other_index));
  }
}

// Reduces every thread's candidate over the block and gives the winner to every thread.
template <typename acc_t, int BLOCK>
__device__ __forceinline__ void block_argmax(acc_t& best, int64_t& best_index) {
  RESFLOW_SHARED_ARRAY(acc_t, warp_values, BLOCK / kWarpSize);
  RESFLOW_SHARED_ARRAY(int64_t, warp_indices, BLOCK / kWarpSize);
  RESFLOW_SHARED(acc_t, result_value);
  RESFLOW_SHARED(int64_t, result_index);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  warp_argmax(best, best_index);
  if (lane == 0) {
    warp_values[warp] = best;
    warp_indices[warp] = best_index;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < BLOCK / kWarpSize ? warp_values[lane] : acc_t(0);
    best_index = lane < BLOCK / kWarpSize ? warp_indices[lane] : -1;
    warp_argmax(best, best_index);
    if (lane == 0) {
      result_value = best;
      result_index = best_index;
    }
  }
  __syncthreads();
  best = result_value;
  best_index = result_index;
  __syncthreads();
}

// First index of the largest |x| over x[0, len), one block, returned to every thread.
template <typename acc_t, int BLOCK>
__device__ __forceinline__ int64_t block_argmax_abs(const acc_t* x, int64_t len) {
  acc_t best = acc_t(0);
  int64_t best_index = -1;
  for (int64_t k = threadIdx.x; k < len; k += BLOCK) {
    take_if_better(best, best_index, math::abs_(x[k]), k);
  }
  block_argmax<acc_t, BLOCK>(best, best_index);
  return best_index;
}

// raw[i] = sum_j W[i, j] x[j] for i < m: a warp per row, lanes along the row (coalesced).
template <typename scalar_t, typename acc_t, int BLOCK>
__device__ __forceinline__ void block_matvec(const scalar_t* __restrict__ w, const acc_t* x, acc_t* raw, int m,
                                             int n) {
  const int lane = threadIdx.x % kWarpSize;
  for (int i = threadIdx.x / kWarpSize; i < m; i += BLOCK / kWarpSize) {
    acc_t s = acc_t(0);
    for (int j = lane; j < n; j += kWarpSize) {
      s += static_cast<acc_t>(w[static_cast<int64_t>(i) * n + j]) * x[j];
    }
    s = warp_reduce(s, SumOp{});
    if (lane == 0) {
      raw[i] = s;
    }
  }
  __syncthreads();
}

// raw[j] = sum_i W[i, j] y[i] for j < n: a thread per column (coalesced across threads).
template <typename scalar_t, typename acc_t, int BLOCK>
__device__ __forceinline__ void block_rmatvec(const scalar_t* __restrict__ w, const acc_t* y, acc_t* raw, int m,
                                              int n) {
  for (int j = threadIdx.x; j < n; j += BLOCK) {
    acc_t s = acc_t(0);
    for (int i = 0; i < m; ++i) {
      s += static_cast<acc_t>(w[static_cast<int64_t>(i) * n + j]) * y[i];
    }
    raw[j] = s;
  }
  __syncthreads();
}

template <typename acc_t>
struct StepChange {
  acc_t squared;  // sum (x_new - x_old)^2
  acc_t max;      // max x_new
};

// x <- dual map of raw, in place; returns what the stopping test needs.
template <typename acc_t, int BLOCK>
__device__ __forceinline__ StepChange<acc_t> block_apply_dual_map(acc_t* x, const acc_t* raw, int len,
                                                                  const math::DualMap<acc_t>& map) {
  acc_t scale = acc_t(1);
  acc_t max_abs = acc_t(1);
  int64_t one_hot = -1;
  if (map.kind == math::DualKind::L2) {
    acc_t ss = acc_t(0);
    for (int k = threadIdx.x; k < len; k += BLOCK) {
      ss += raw[k] * raw[k];
    }
    const acc_t norm = math::sqrt_(block_all_reduce<acc_t, BLOCK>(ss, SumOp{}, acc_t(0)));
    scale = norm < acc_t(math::kNormalizeEps) ? acc_t(math::kNormalizeEps) : norm;
  } else if (map.kind == math::DualKind::ProjMax) {
    one_hot = block_argmax_abs<acc_t, BLOCK>(raw, len);
  } else {
    acc_t m = acc_t(0);
    for (int k = threadIdx.x; k < len; k += BLOCK) {
      m = MaxOp{}(m, math::abs_(raw[k]));
    }
    max_abs = block_all_reduce<acc_t, BLOCK>(m, MaxOp{}, acc_t(0));
    acc_t s = acc_t(0);
    for (int k = threadIdx.x; k < len; k += BLOCK) {
      s += math::pow_(math::hoelder_magnitude(raw[k], max_abs, map.exponent), map.dual_p);
    }
    scale = math::pow_(block_all_reduce<acc_t, BLOCK>(s, SumOp{}, acc_t(0)), acc_t(1) / map.dual_p);
  }
  acc_t squared = acc_t(0);
  acc_t largest = -INFINITY;
  for (int k = threadIdx.x; k < len; k += BLOCK) {
    const acc_t value = math::dual_map_value(map, raw[k], k, scale, max_abs, one_hot);
    const acc_t d = value - x[k];
    squared += d * d;
    largest = MaxOp{}(largest, value);
    x[k] = value;
  }
  StepChange<acc_t> change;
  change.squared = block_all_reduce<acc_t, BLOCK>(squared, SumOp{}, acc_t(0));
  change.max = block_all_reduce<acc_t, BLOCK>(largest, MaxOp{}, acc_t(-INFINITY));
  return change;
}

template <typename acc_t>
struct PowerIterationArgs {
  int m, n;              // the batch's matrix shape (power_iteration_kernel; listed jobs carry their own)
  acc_t sqrt_m, sqrt_n;  // for the stopping test (math::step_converged)
  int max_iterations;
  bool use_tolerance;
  acc_t atol, rtol;
  math::DualMap<acc_t> u_map, v_map;
  bool u_first;
};

// The whole loop for one m x n matrix W (row-major) in one block: u, v and the raw product in
// dynamic shared memory, where u and v stay for the caller to store (store_vectors), so that the
// output pointers need not be live through the loop. Every thread returns sigma = u^T W v and the
// iterations run. (The arguments arrive by value: a reference to a kernel parameter would make
// the compiler copy it to local memory.)
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void power_iteration_block(const scalar_t* __restrict__ w, const scalar_t* u_in,
                                                      const scalar_t* v_in, int m, int n, acc_t sqrt_m, acc_t sqrt_n,
                                                      const PowerIterationArgs<acc_t> a, acc_t& sigma,
                                                      int& iterations) {
  constexpr int BLOCK = kPowerIterationThreads;
  RESFLOW_DYNAMIC_SHARED(double, power_iteration_shared);
  acc_t* u = reinterpret_cast<acc_t*>(power_iteration_shared);
  acc_t* v = u + m;
  acc_t* raw = v + n;
  for (int k = threadIdx.x; k < m; k += BLOCK) {
    u[k] = static_cast<acc_t>(u_in[k]);
  }
  for (int k = threadIdx.x; k < n; k += BLOCK) {
    v[k] = static_cast<acc_t>(v_in[k]);
  }
  __syncthreads();
  int it = 0;
  while (it < a.max_iterations) {
    StepChange<acc_t> du, dv;
    if (a.u_first) {
      block_matvec<scalar_t, acc_t, BLOCK>(w, v, raw, m, n);
      du = block_apply_dual_map<acc_t, BLOCK>(u, raw, m, a.u_map);
      block_rmatvec<scalar_t, acc_t, BLOCK>(w, u, raw, m, n);
      dv = block_apply_dual_map<acc_t, BLOCK>(v, raw, n, a.v_map);
    } else {
      block_rmatvec<scalar_t, acc_t, BLOCK>(w, u, raw, m, n);
      dv = block_apply_dual_map<acc_t, BLOCK>(v, raw, n, a.v_map);
      block_matvec<scalar_t, acc_t, BLOCK>(w, v, raw, m, n);
      du = block_apply_dual_map<acc_t, BLOCK>(u, raw, m, a.u_map);
    }
    ++it;
    // Every thread holds the same reductions, so the whole block leaves together.
    if (a.use_tolerance && math::step_converged(du.squared, sqrt_m, du.max, a.atol, a.rtol) &&
        math::step_converged(dv.squared, sqrt_n, dv.max, a.atol, a.rtol)) {
      break;
    }
  }
  block_matvec<scalar_t, acc_t, BLOCK>(w, v, raw, m, n);
  acc_t partial = acc_t(0);
  for (int k = threadIdx.x; k < m; k += BLOCK) {
    partial += u[k] * raw[k];
  }
  sigma = block_sum<acc_t, BLOCK>(partial);
  iterations = it;
}

// Stores the u and v that power_iteration_block left in shared memory.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vectors(scalar_t* u_out, scalar_t* v_out, int m, int n) {
  RESFLOW_DYNAMIC_SHARED(double, power_iteration_shared);
  const acc_t* u = reinterpret_cast<const acc_t*>(power_iteration_shared);
  const acc_t* v = u + m;
  for (int k = threadIdx.x; k < m; k += kPowerIterationThreads) {
    u_out[k] = static_cast<scalar_t>(u[k]);
  }
  for (int k = threadIdx.x; k < n; k += kPowerIterationThreads) {
    v_out[k] = static_cast<scalar_t>(v[k]);
  }
}

// A contiguous batch of equal-shaped matrices (power_iteration), one block each: matrix b at
// offsets b·m·n, b·m and b·n; its sigma and iteration count at b.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPowerIterationThreads)
    power_iteration_kernel(const scalar_t* __restrict__ weight, const scalar_t* __restrict__ u_in,
                           const scalar_t* __restrict__ v_in, scalar_t* __restrict__ u_out,
                           scalar_t* __restrict__ v_out, acc_t* __restrict__ sigma_out,
                           int64_t* __restrict__ iterations_out, PowerIterationArgs<acc_t> a) {
  const int64_t b = blockIdx.x;
  acc_t sigma;
  int it;
  power_iteration_block<scalar_t, acc_t>(weight + b * a.m * a.n, u_in + b * a.m, v_in + b * a.n, a.m, a.n, a.sqrt_m,
                                         a.sqrt_n, a, sigma, it);
  store_vectors<scalar_t, acc_t>(u_out + b * a.m, v_out + b * a.n, a.m, a.n);
  if (threadIdx.x == 0) {
    sigma_out[b] = sigma;
    iterations_out[b] = it;
  }
}

// One listed matrix (m x n, row-major) and where its results go; u_in may equal u_out and v_in
// v_out (the block reads its vectors before it writes them).
template <typename scalar_t, typename acc_t>
struct MatrixJob {
  const scalar_t* weight;
  const scalar_t* u_in;
  const scalar_t* v_in;
  scalar_t* u_out;
  scalar_t* v_out;
  acc_t* sigma;
  int m, n;
  acc_t sqrt_m, sqrt_n;  // for the stopping test (math::step_converged)
};

// Up to kListedJobs matrices of any shapes, passed by value in the kernel's parameters
// (power_iteration_update_: a model's layers in one launch per kListedJobs, results written into
// the layers' buffers). No upload of a job table, so a CUDA graph captures it safely.
constexpr int kListedJobs = 48;

template <typename scalar_t, typename acc_t>
struct ListedJobs {
  MatrixJob<scalar_t, acc_t> jobs[kListedJobs];
};
static_assert(sizeof(ListedJobs<float, float>) + sizeof(PowerIterationArgs<float>) <= 4096,
              "a kernel's parameters must fit in 4 KiB");

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPowerIterationThreads)
    power_iteration_list_kernel(ListedJobs<scalar_t, acc_t> jobs, PowerIterationArgs<acc_t> a) {
  const int b = blockIdx.x;
  acc_t sigma;
  int it;
  power_iteration_block<scalar_t, acc_t>(jobs.jobs[b].weight, jobs.jobs[b].u_in, jobs.jobs[b].v_in, jobs.jobs[b].m,
                                         jobs.jobs[b].n, jobs.jobs[b].sqrt_m, jobs.jobs[b].sqrt_n, a, sigma, it);
  // The outputs' pointers are read from the parameters only now.
  store_vectors<scalar_t, acc_t>(jobs.jobs[b].u_out, jobs.jobs[b].v_out, jobs.jobs[b].m, jobs.jobs[b].n);
  if (threadIdx.x == 0) {
    *jobs.jobs[b].sigma = sigma;
  }
}

struct PowerIterationPlan {
  int blocks;
  int threads;
  size_t shared_bytes;  // dynamic
  bool fits;            // false: use the ATen loop (vectors too long for shared memory, or W too large)
};

// Static shared memory of power_iteration_kernel, an upper bound: its block reductions' arrays
// (block_argmax and two block_all_reduce instantiations, a few hundred bytes in double). The
// emulated tests measure the real size (what cudaFuncGetAttributes reports as sharedSizeBytes)
// and check it stays below this.
constexpr size_t kPowerIterationStaticSharedBytes = 512;
// Largest W the single-block kernel takes when the batch does not fill the GPU: one SM reads W
// twice per iteration, which for a larger W costs more than the half-dozen launches per iteration
// of the ATen loop, whose products use the whole GPU.
constexpr size_t kFusedMaxMatrixBytes = 2 * 1024 * 1024;

// One block per matrix with u, v and the raw product (length max(m, n)) in dynamic shared memory,
// when those and the kernel's static shared memory fit max_shared_bytes, and either W is small
// or there are at least as many matrices as SMs.
template <typename scalar_t, typename acc_t>
PowerIterationPlan plan_power_iteration(int64_t batch, int64_t m, int64_t n, size_t max_shared_bytes, int sm_count) {
  const size_t bytes = static_cast<size_t>(m + n + (m > n ? m : n)) * sizeof(acc_t);
  const bool shared_fits = bytes + kPowerIterationStaticSharedBytes <= max_shared_bytes;
  const bool small = static_cast<size_t>(m) * static_cast<size_t>(n) * sizeof(scalar_t) <= kFusedMaxMatrixBytes;
  const bool fills_gpu = batch >= sm_count;
  return {static_cast<int>(batch), kPowerIterationThreads, bytes, shared_fits && (small || fills_gpu) && batch > 0};
}

template <typename scalar_t, typename acc_t>
void launch_power_iteration(const PowerIterationPlan& plan, const scalar_t* weight, const scalar_t* u_in,
                            const scalar_t* v_in, scalar_t* u_out, scalar_t* v_out, acc_t* sigma, int64_t* iterations,
                            const PowerIterationArgs<acc_t>& args, cudaStream_t stream) {
  const auto kernel = &power_iteration_kernel<scalar_t, acc_t>;
  RESFLOW_LAUNCH(kernel, plan.blocks, plan.threads, plan.shared_bytes, stream)(weight, u_in, v_in, u_out, v_out, sigma,
                                                                                iterations, args);
}

template <typename scalar_t, typename acc_t>
void launch_power_iteration_list(const PowerIterationPlan& plan, const ListedJobs<scalar_t, acc_t>& jobs,
                                 const PowerIterationArgs<acc_t>& args, cudaStream_t stream) {
  const auto kernel = &power_iteration_list_kernel<scalar_t, acc_t>;
  RESFLOW_LAUNCH(kernel, plan.blocks, plan.threads, plan.shared_bytes, stream)(jobs, args);
}

// ---------------------------------------------------------------------------------------------
// Power iteration on an operator applied with ATen (convolutions; matrices too large for shared
// memory): the dual map of a long vector as grid-wide reductions, and the stopping test on the
// device. Per half-step: one or two stats launches and one apply launch; per iteration one
// convergence launch. A device-side `done` flag freezes u and v once the test has passed.
// ---------------------------------------------------------------------------------------------

constexpr int kVectorThreads = 256;

// Per-block partial reductions of a vector for its dual map, `blocks` entries each.
template <typename acc_t>
struct VectorStats {
  acc_t* value;      // L2: sum of squares; ProjMax / Hoelder: max |raw|
  int64_t* index;    // ProjMax: first index of that max
  acc_t* power_sum;  // Hoelder: sum of t^dual_p (second pass)
  int blocks;
};

// Sum / max of per-block partials, computed by every block that needs them.
template <typename acc_t, int BLOCK>
__device__ __forceinline__ acc_t reduce_partials_sum(const acc_t* partials, int count) {
  acc_t v = acc_t(0);
  for (int p = threadIdx.x; p < count; p += BLOCK) {
    v += partials[p];
  }
  return block_sum<acc_t, BLOCK>(v);
}

template <typename acc_t, int BLOCK>
__device__ __forceinline__ acc_t reduce_partials_max(const acc_t* partials, int count) {
  acc_t v = -INFINITY;
  for (int p = threadIdx.x; p < count; p += BLOCK) {
    v = MaxOp{}(v, partials[p]);
  }
  return block_all_reduce<acc_t, BLOCK>(v, MaxOp{}, acc_t(-INFINITY));
}

// pass 0: sum of squares (L2) or the (max |raw|, first index) candidate; pass 1 (Hoelder): the
// sum of t^dual_p with t = (|raw| / max|raw|)^exponent.
template <typename acc_t>
__global__ void __launch_bounds__(kVectorThreads)
    dual_stats_kernel(const acc_t* __restrict__ raw, int64_t len, math::DualMap<acc_t> map, int pass,
                      VectorStats<acc_t> stats) {
  constexpr int BLOCK = kVectorThreads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * BLOCK;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * BLOCK + threadIdx.x;
  if (pass == 1) {
    const acc_t max_abs = reduce_partials_max<acc_t, BLOCK>(stats.value, stats.blocks);
    acc_t s = acc_t(0);
    for (int64_t k = first; k < len; k += stride) {
      s += math::pow_(math::hoelder_magnitude(raw[k], max_abs, map.exponent), map.dual_p);
    }
    s = block_sum<acc_t, BLOCK>(s);
    if (threadIdx.x == 0) {
      stats.power_sum[blockIdx.x] = s;
    }
    return;
  }
  if (map.kind == math::DualKind::L2) {
    acc_t ss = acc_t(0);
    for (int64_t k = first; k < len; k += stride) {
      ss += raw[k] * raw[k];
    }
    ss = block_sum<acc_t, BLOCK>(ss);
    if (threadIdx.x == 0) {
      stats.value[blockIdx.x] = ss;
    }
    return;
  }
  acc_t best = acc_t(0);
  int64_t best_index = -1;
  for (int64_t k = first; k < len; k += stride) {
    take_if_better(best, best_index, math::abs_(raw[k]), k);
  }
  block_argmax<acc_t, BLOCK>(best, best_index);
  if (threadIdx.x == 0) {
    stats.value[blockIdx.x] = best;
    stats.index[blockIdx.x] = best_index;
  }
}

// x <- dual map of raw unless *done; per-block sum (x_new - x_old)^2 and max x_new for the test.
// Every block finishes the reductions of the stats launches itself (a few hundred partials).
template <typename acc_t>
__global__ void __launch_bounds__(kVectorThreads)
    dual_apply_kernel(const acc_t* __restrict__ raw, acc_t* __restrict__ x, int64_t len, math::DualMap<acc_t> map,
                      VectorStats<acc_t> stats, const bool* __restrict__ done, acc_t* __restrict__ change_sq,
                      acc_t* __restrict__ change_max) {
  constexpr int BLOCK = kVectorThreads;
  acc_t scale = acc_t(1), max_abs = acc_t(0);
  int64_t one_hot = -1;
  if (map.kind == math::DualKind::L2) {
    const acc_t norm = math::sqrt_(reduce_partials_sum<acc_t, BLOCK>(stats.value, stats.blocks));
    scale = norm < acc_t(math::kNormalizeEps) ? acc_t(math::kNormalizeEps) : norm;
  } else if (map.kind == math::DualKind::ProjMax) {
    acc_t best = acc_t(0);
    for (int p = threadIdx.x; p < stats.blocks; p += BLOCK) {
      take_if_better(best, one_hot, stats.value[p], stats.index[p]);
    }
    block_argmax<acc_t, BLOCK>(best, one_hot);
  } else {
    max_abs = reduce_partials_max<acc_t, BLOCK>(stats.value, stats.blocks);
    scale = math::pow_(reduce_partials_sum<acc_t, BLOCK>(stats.power_sum, stats.blocks), acc_t(1) / map.dual_p);
  }
  acc_t squared = acc_t(0);
  acc_t largest = -INFINITY;
  if (!*done) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * BLOCK;
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * BLOCK + threadIdx.x; k < len; k += stride) {
      const acc_t value = math::dual_map_value(map, raw[k], k, scale, max_abs, one_hot);
      const acc_t d = value - x[k];
      squared += d * d;
      largest = MaxOp{}(largest, value);
      x[k] = value;
    }
  }
  squared = block_sum<acc_t, BLOCK>(squared);
  largest = block_all_reduce<acc_t, BLOCK>(largest, MaxOp{}, acc_t(-INFINITY));
  if (threadIdx.x == 0) {
    change_sq[blockIdx.x] = squared;
    change_max[blockIdx.x] = largest;
  }
}

template <typename acc_t>
struct StepChanges {  // per-block outputs of dual_apply_kernel for one vector
  const acc_t* squared;
  const acc_t* max;
  int blocks;
  int64_t len;
};

// One block: counts the iteration unless already done, then runs the stopping test.
template <typename acc_t>
__global__ void __launch_bounds__(kVectorThreads)
    convergence_kernel(StepChanges<acc_t> u, StepChanges<acc_t> v, bool use_tolerance, acc_t atol, acc_t rtol,
                       bool* __restrict__ done, int64_t* __restrict__ iterations) {
  constexpr int BLOCK = kVectorThreads;
  if (*done) {
    return;
  }
  const acc_t u_sq = reduce_partials_sum<acc_t, BLOCK>(u.squared, u.blocks);
  const acc_t u_max = reduce_partials_max<acc_t, BLOCK>(u.max, u.blocks);
  const acc_t v_sq = reduce_partials_sum<acc_t, BLOCK>(v.squared, v.blocks);
  const acc_t v_max = reduce_partials_max<acc_t, BLOCK>(v.max, v.blocks);
  if (threadIdx.x == 0) {
    *iterations += 1;
    if (use_tolerance && math::step_converged(u_sq, math::sqrt_(acc_t(u.len)), u_max, atol, rtol) &&
        math::step_converged(v_sq, math::sqrt_(acc_t(v.len)), v_max, atol, rtol)) {
      *done = true;
    }
  }
}

// x <- dual map of raw (two or three launches).
template <typename acc_t>
void launch_dual_map(const acc_t* raw, acc_t* x, int64_t len, const math::DualMap<acc_t>& map,
                     const VectorStats<acc_t>& stats, const bool* done, acc_t* change_sq, acc_t* change_max,
                     cudaStream_t stream) {
  const auto stats_kernel = &dual_stats_kernel<acc_t>;
  RESFLOW_LAUNCH(stats_kernel, stats.blocks, kVectorThreads, 0, stream)(raw, len, map, 0, stats);
  if (map.kind == math::DualKind::Hoelder) {
    RESFLOW_LAUNCH(stats_kernel, stats.blocks, kVectorThreads, 0, stream)(raw, len, map, 1, stats);
  }
  const auto apply_kernel = &dual_apply_kernel<acc_t>;
  RESFLOW_LAUNCH(apply_kernel, stats.blocks, kVectorThreads, 0, stream)(raw, x, len, map, stats, done, change_sq,
                                                                        change_max);
}

template <typename acc_t>
void launch_convergence(const StepChanges<acc_t>& u, const StepChanges<acc_t>& v, bool use_tolerance, acc_t atol,
                        acc_t rtol, bool* done, int64_t* iterations, cudaStream_t stream) {
  const auto kernel = &convergence_kernel<acc_t>;
  RESFLOW_LAUNCH(kernel, 1, kVectorThreads, 0, stream)(u, v, use_tolerance, atol, rtol, done, iterations);
}

}  // namespace resflow_cuda::cuda
