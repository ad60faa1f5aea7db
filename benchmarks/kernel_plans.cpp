// Prints, one JSON object per line, the launch configuration our launchers pick for every CUDA
// kernel at the sizes of the benchmark cases, for an A100 (sm_80, 108 SMs) and an H100 SXM (sm_90,
// 132 SMs). benchmarks/kernel_report.py builds it with the host compiler against the same
// torch-free plan functions the CUDA bindings call (csrc/cuda/*.cuh, under the CPU emulation
// header), so the report shows what the launchers do, not a copy of their rules.
#include <cstdio>

#include "lipswish_kernels.cuh"
#include "logdet_series_kernels.cuh"
#include "power_iteration_kernels.cuh"

using namespace resflow_cuda::cuda;

namespace {

void print(const char* arch, int sms, const char* kernel, const char* size, long blocks, int threads,
           size_t shared_bytes, int vec, bool fits) {
  std::printf(
      "{\"arch\": \"%s\", \"sm_count\": %d, \"kernel\": \"%s\", \"size\": \"%s\", \"blocks\": %ld, "
      "\"threads\": %d, \"dynamic_shared_bytes\": %zu, \"vec\": %d, \"fits\": %s}\n",
      arch, sms, kernel, size, blocks, threads, shared_bytes, vec, fits ? "true" : "false");
}

}  // namespace

int main() {
  const struct { const char* arch; int sms; } gpus[] = {{"sm_80", 108}, {"sm_90", 132}};
  const struct { const char* label; long n; } elementwise[] = {
      {"256x1024", 256L * 1024}, {"64x64x32x32", 64L * 64 * 32 * 32}, {"4096x4096", 4096L * 4096}};
  const struct { const char* label; long rows, cols; } series[] = {
      {"500x2 (toy)", 500, 2}, {"256x64 (tabular)", 256, 64}, {"16x768 (conv 3x16x16)", 16, 768}};
  const struct { const char* label; long batch, m, n; } matrices[] = {
      {"128x128", 1, 128, 128}, {"512x512", 1, 512, 512}, {"3072x128", 1, 3072, 128}, {"4 x 128x128", 4, 128, 128}};
  const struct { const char* label; long len; } vectors[] = {{"3x32x32", 3L * 32 * 32}, {"512x32x32", 512L * 32 * 32}};
  for (const auto& gpu : gpus) {
    for (const auto& e : elementwise) {
      const auto plan = plan_elementwise<float>(e.n, gpu.sms, true);
      for (const char* k : {"lipswish_forward_kernel", "lipswish_backward_kernel", "lipswish_double_backward_kernel"}) {
        print(gpu.arch, gpu.sms, k, e.label, plan.blocks, plan.threads, 0, plan.vec, true);
      }
    }
    print(gpu.arch, gpu.sms, "finish_sum_kernel", "any", 1, kElementwiseThreads, 0, 1, true);
    for (const auto& s : series) {
      const auto plan = plan_series<float>(s.rows, s.cols, gpu.sms, true);
      print(gpu.arch, gpu.sms, "logdet_series_kernel", s.label, plan.blocks, kSeriesThreads, 0, plan.vec, true);
    }
    for (const auto& m : matrices) {
      const auto plan = plan_power_iteration<float, float>(m.batch, m.m, m.n, kDefaultMaxSharedBytes, gpu.sms);
      for (const char* k : {"power_iteration_kernel", "power_iteration_list_kernel"}) {
        print(gpu.arch, gpu.sms, k, m.label, plan.blocks, plan.threads, plan.shared_bytes, 1, plan.fits);
      }
    }
    for (const auto& v : vectors) {
      const long blocks = plan_elementwise<float>(v.len, gpu.sms, false).blocks;
      for (const char* k : {"dual_stats_kernel", "dual_apply_kernel"}) {
        print(gpu.arch, gpu.sms, k, v.label, blocks, kVectorThreads, 0, 1, true);
      }
    }
    print(gpu.arch, gpu.sms, "convergence_kernel", "any", 1, kVectorThreads, 0, 1, true);
  }
  return 0;
}
