// The parallel loop of the CPU ops: fixed-size chunks spread over at::parallel_for threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace resflow_cuda::cpu {

// Elements per chunk: large enough to amortise scheduling, small enough to split (256, 1024)
// over two threads and keep each chunk's operands in L2.
constexpr int64_t kElementwiseChunk = 1 << 14;

// Runs fn(begin, end) -> Sum over [0, n) chunk by chunk, in parallel, and returns the sum of the
// results added in chunk order (Sum: double, or a struct of several sums with +=). Chunk boundaries
// do not depend on the number of threads, so neither does the sum (reductions such as grad_beta are
// reproducible across machines).
template <class Sum = double, class Fn>
Sum parallel_chunk_sum(int64_t n, const Fn& fn, int64_t chunk = kElementwiseChunk) {
  if (n <= 0) {
    return Sum{};
  }
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (chunks == 1) {
    return fn(int64_t{0}, n);
  }
  std::vector<Sum> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      partial[c] = fn(c * chunk, std::min(n, (c + 1) * chunk));
    }
  });
  Sum total{};
  for (const Sum& p : partial) {
    total += p;
  }
  return total;
}

}  // namespace resflow_cuda::cpu
