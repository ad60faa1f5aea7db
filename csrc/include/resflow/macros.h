// Portability macros shared by the host compiler, nvcc and the CUDA emulator.
// Torch-free: included by the math headers that both backends compile.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RESFLOW_HOST_DEVICE __host__ __device__
#define RESFLOW_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define RESFLOW_HOST_DEVICE
#define RESFLOW_HOST_DEVICE_INLINE inline
#endif

#if defined(__GNUC__) || defined(__clang__) || defined(__CUDACC__)
#define RESFLOW_RESTRICT __restrict__
#else
#define RESFLOW_RESTRICT
#endif
