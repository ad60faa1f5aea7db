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
// Static shared memory, a variable or an array: plain __shared__ here; in the emulator a
// function-local static whose size counts, with the launch's dynamic bytes, against the 48 KiB a
// block may use (a launch plan that forgets the static part fails there as on a GPU).
#define RESFLOW_SHARED(type, name) __shared__ type name
#define RESFLOW_SHARED_ARRAY(type, name, count) __shared__ type name[count]
#else
#include "emulation/emulator.h"
#define RESFLOW_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::resflow_emu::launcher((kernel), (grid), (block), (shared_bytes), (stream), __FILE__, __LINE__)
#define RESFLOW_DYNAMIC_SHARED(type, name) type* name = ::resflow_emu::dynamic_shared<type>()
#define RESFLOW_SHARED(type, name) \
  static type name;                \
  ::resflow_emu::note_static_shared(&name, sizeof(name))
#define RESFLOW_SHARED_ARRAY(type, name, count) \
  static type name[count];                      \
  ::resflow_emu::note_static_shared(name, sizeof(name))
#endif
