// Host-side helpers of the .cu bindings: SM counts and the CUDA Backend. Light headers only: the
// toolkit here has no cuBLAS/cuSPARSE headers, which ATen/cuda/CUDAContext.h would pull in.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <ATen/ops/cudnn_convolution.h>
#include <ATen/ops/cudnn_convolution_transpose.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "host/power_iteration_host.h"
#include "kernel_utils.cuh"

#include <array>
#include <cstddef>
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

// The convolutions of the conv power iteration: cuDNN's with TF32 off whatever the user's global
// setting (on Ampere and newer, cuDNN's float32 convolutions default to TF32, whose 10-bit mantissa
// would move u, v and sigma away from the reference's float32 arithmetic), ATen's where cuDNN is
// disabled or absent (their CUDA kernels do not use TF32 for convolutions).
inline Convolutions convolutions_without_tf32() {
  const auto& ctx = at::globalContext();
  if (!ctx.userEnabledCuDNN() || !at::detail::getCUDAHooks().compiledWithCuDNN()) {
    return aten_convolutions();
  }
  return {[](const at::Tensor& x, const at::Tensor& kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
            const auto& c = at::globalContext();
            return at::cudnn_convolution(x, kernel, padding, stride, {1, 1}, 1, c.benchmarkCuDNN(),
                                         c.deterministicCuDNN(), /*allow_tf32=*/false);
          },
          [](const at::Tensor& y, const at::Tensor& kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
            const auto& c = at::globalContext();
            return at::cudnn_convolution_transpose(y, kernel, padding, {0, 0}, stride, {1, 1}, 1, c.benchmarkCuDNN(),
                                                   c.deterministicCuDNN(), /*allow_tf32=*/false);
          }};
}

// Reads a device bool on the host without draining the stream: request() queues a copy to pinned
// host memory and an event behind the work queued so far; arrived() asks the event without
// waiting; wait() waits for that point of the stream only (work queued after it keeps running).
// While the stream is being captured into a CUDA graph nothing is requested (a graph cannot wait
// on the host), so the caller runs to its iteration limit.
class DeviceFlagPoll {
 public:
  explicit DeviceFlagPoll(const at::Tensor& flag) : flag_(flag) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture));
    capturing_ = capture != cudaStreamCaptureStatusNone;
    if (!capturing_) {  // no pinned allocation or event creation inside a capture
      host_ = at::empty({}, flag.options().device(at::kCPU).pinned_memory(true));
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    }
  }
  DeviceFlagPoll(const DeviceFlagPoll&) = delete;
  DeviceFlagPoll& operator=(const DeviceFlagPoll&) = delete;
  ~DeviceFlagPoll() {
    if (event_ != nullptr) {
      cudaEventDestroy(event_);
    }
  }

  void request() {
    if (capturing_) {
      return;
    }
    host_.copy_(flag_, /*non_blocking=*/true);
    C10_CUDA_CHECK(cudaEventRecord(event_, c10::cuda::getCurrentCUDAStream()));
    pending_ = true;
  }
  bool pending() const { return pending_; }
  bool arrived() const {
    if (!pending_) {
      return false;
    }
    const cudaError_t status = cudaEventQuery(event_);
    if (status == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: clear it
      return false;
    }
    C10_CUDA_CHECK(status);
    return true;
  }
  bool value() {
    pending_ = false;
    return *host_.const_data_ptr<bool>();
  }
  bool wait() {
    C10_CUDA_CHECK(cudaEventSynchronize(event_));
    return value();
  }

 private:
  at::Tensor flag_, host_;
  cudaEvent_t event_ = nullptr;
  bool capturing_ = false, pending_ = false;
};

// The Backend of the shared tensor bindings (*_binding.h) on a real GPU: a device guard, the
// current stream, the device's SM count and per-block shared memory, the convolutions, a poll of
// device flags, and launch checks.
struct CudaBackend {
  c10::cuda::CUDAGuard guard(const at::Tensor& t) const { return c10::cuda::CUDAGuard(t.device()); }
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream(); }
  int sm_count(const at::Tensor& t) const { return cuda::sm_count(t.get_device()); }
  size_t max_shared_bytes() const { return kDefaultMaxSharedBytes; }
  Convolutions convolutions() const { return convolutions_without_tf32(); }
  DeviceFlagPoll flag_poll(const at::Tensor& flag) const { return DeviceFlagPoll(flag); }
  void check_launch() const { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
};

}  // namespace resflow_cuda::cuda
