// The one include of every kernel header (csrc/cuda/*.cuh). Under nvcc it is the real CUDA
// runtime; under a host compiler it is the project's CPU emulation of the CUDA execution model
// (tests only, see docs/cuda-emulation.md), so the same kernel source runs in CPU tests.
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
// Launches `kernel` (a function pointer, so template arguments need no parentheses):
//   RESFLOW_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...);
#define RESFLOW_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<(grid), (block), (shared_bytes), (stream)>>>
// Dynamic shared memory: `extern __shared__` here, a poisoned per-block buffer in the emulator.
#define RESFLOW_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#else
#include "emulation/emulator.h"
#define RESFLOW_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::resflow_emu::launcher((kernel), (grid), (block), (shared_bytes), (stream), __FILE__, __LINE__)
#define RESFLOW_DYNAMIC_SHARED(type, name) type* name = ::resflow_emu::dynamic_shared<type>()
#endif
