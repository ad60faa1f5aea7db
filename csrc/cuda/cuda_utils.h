// Host-side helpers of the .cu bindings: SM counts and launch checks. Light headers only: the
// toolkit here has no cuBLAS/cuSPARSE headers, which ATen/cuda/CUDAContext.h would pull in.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>

namespace resflow_cuda::cuda {

// Multiprocessor count of a device, queried once per device.
inline int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "resflow_cuda: device index ", device, " out of range");
  int sms = cache[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

}  // namespace resflow_cuda::cuda
