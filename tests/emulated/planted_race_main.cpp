// Standalone driver of the planted-race probe for the ThreadSanitizer test (no torch): runs
// shared_reverse_kernel with or without its __syncthreads on two blocks and checks the result.
// Usage: planted_race race|fixed. Exit 0 when the values are right, 1 when they are wrong;
// under TSan a reported race makes the exit code 66.
#include <cstdio>
#include <cstring>
#include <vector>

#include "probe_kernels.cuh"

int main(int argc, char** argv) {
  const bool race = argc > 1 && std::strcmp(argv[1], "race") == 0;
  std::vector<float> x(256), y(256);
  for (int i = 0; i < 256; ++i) {
    x[i] = static_cast<float>(i);
  }
  if (race) {
    const auto kernel = &resflow_emu_probe::shared_reverse_kernel<false>;
    RESFLOW_LAUNCH(kernel, 2, 128, 0, nullptr)(x.data(), y.data());
  } else {
    const auto kernel = &resflow_emu_probe::shared_reverse_kernel<true>;
    RESFLOW_LAUNCH(kernel, 2, 128, 0, nullptr)(x.data(), y.data());
  }
  int wrong = 0;
  for (int b = 0; b < 2; ++b) {
    for (int t = 0; t < 128; ++t) {
      wrong += y[b * 128 + t] != x[b * 128 + 127 - t];
    }
  }
  std::printf("%s: %d of 256 values wrong\n", race ? "race" : "fixed", wrong);
  return wrong == 0 ? 0 : 1;
}
