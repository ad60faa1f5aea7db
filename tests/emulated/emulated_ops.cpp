// resflow_emulated: the CUDA kernels of csrc/cuda run on CPU tensors under the CPU emulation of
// the CUDA execution model (csrc/emulation/emulator.h), through the same tensor bindings,
// launch plans and launchers as the CUDA ops; only the Backend differs (no device guard or stream,
// and the SM count is an argument, so tests choose the grid). Also the probe kernels that test
// the emulator itself. Test infrastructure: built by tests/emulation.py, never by setup.py.
#include <cxxabi.h>
#include <dlfcn.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "cuda/actnorm_binding.h"
#include "cuda/add_scaled_binding.h"
#include "cuda/dense_jacobian_binding.h"
#include "cuda/lipswish_binding.h"
#include "cuda/logdet_series_binding.h"
#include "cuda/moments_binding.h"
#include "cuda/power_iteration_binding.h"
#include "probe_kernels.cuh"

namespace {

namespace cu = resflow_cuda::cuda;

// Emulated launches complete before they return, so a requested flag has always arrived.
class HostFlagPoll {
 public:
  explicit HostFlagPoll(at::Tensor flag) : flag_(std::move(flag)) {}
  void request() {
    value_ = flag_.item<bool>();
    pending_ = true;
  }
  bool pending() const { return pending_; }
  bool arrived() const { return pending_; }
  bool value() {
    pending_ = false;
    return value_;
  }
  bool wait() { return value(); }

 private:
  at::Tensor flag_;
  bool value_ = false, pending_ = false;
};

// The GPU the tests pretend to have: its SM count and per-block shared memory shape the launches.
struct EmulatedBackend {
  int sms;
  size_t shared_bytes = cu::kDefaultMaxSharedBytes;
  struct NoGuard {};
  NoGuard guard(const at::Tensor&) const { return {}; }
  cudaStream_t stream() const { return nullptr; }
  int sm_count(const at::Tensor&) const { return sms; }
  size_t max_shared_bytes() const { return shared_bytes; }
  resflow_cuda::Convolutions convolutions() const { return resflow_cuda::aten_convolutions(); }
  HostFlagPoll flag_poll(const at::Tensor& flag) const { return HostFlagPoll(flag); }
  void check_launch() const {}
};

EmulatedBackend backend(int64_t sm_count) {
  TORCH_CHECK(sm_count > 0, "resflow_emulated: expected sm_count > 0, but got ", sm_count);
  return EmulatedBackend{static_cast<int>(sm_count)};
}

EmulatedBackend shared_backend(int64_t max_shared_bytes) {
  TORCH_CHECK(max_shared_bytes >= 0, "resflow_emulated: expected max_shared_bytes >= 0, but got ", max_shared_bytes);
  return EmulatedBackend{1, static_cast<size_t>(max_shared_bytes)};
}

// max_shared_bytes below what a matrix needs sends it down the ATen path with the device flag.
resflow_cuda::PowerIterationResult power_iteration(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                         int64_t max_iterations, c10::optional<double> atol,
                                         c10::optional<double> rtol, double domain, double codomain, bool u_first,
                                         int64_t max_shared_bytes) {
  return cu::power_iteration_on(shared_backend(max_shared_bytes), weight, u, v, max_iterations, atol, rtol, domain,
                                codomain, u_first);
}

void power_iteration_update_(at::TensorList weights, at::TensorList us, at::TensorList vs, at::TensorList sigmas,
                             int64_t max_iterations, c10::optional<double> atol, c10::optional<double> rtol,
                             double domain, double codomain, bool u_first) {
  cu::power_iteration_update_on(backend(1), weights, us, vs, sigmas, max_iterations, atol, rtol, domain, codomain,
                                u_first);
}

resflow_cuda::PowerIterationResult conv_power_iteration(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                              at::IntArrayRef input_size, at::IntArrayRef stride,
                                              at::IntArrayRef padding, int64_t max_iterations,
                                              c10::optional<double> atol, c10::optional<double> rtol, double domain,
                                              double codomain, bool u_first) {
  return cu::conv_power_iteration_on(backend(1), weight, u, v, input_size, stride, padding, max_iterations, atol,
                                     rtol, domain, codomain, u_first);
}

at::Tensor lipswish(const at::Tensor& x, const at::Tensor& beta, int64_t sms) {
  return std::get<0>(cu::lipswish_forward_on(backend(sms), "resflow_emulated.lipswish", x, beta, false));
}

std::tuple<at::Tensor, at::Tensor> lipswish_with_derivative(const at::Tensor& x, const at::Tensor& beta, int64_t sms) {
  return cu::lipswish_forward_on(backend(sms), "resflow_emulated.lipswish_with_derivative", x, beta, true);
}

std::tuple<at::Tensor, at::Tensor> lipswish_backward(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& beta, int64_t sms) {
  return cu::lipswish_backward_on(backend(sms), grad, x, beta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lipswish_double_backward(const at::Tensor& grad, const at::Tensor& gg_x,
                                                                        const at::Tensor& gg_beta, const at::Tensor& x,
                                                                        const at::Tensor& beta, int64_t sms) {
  return cu::lipswish_double_backward_on(backend(sms), grad, gg_x, gg_beta, x, beta);
}

void logdet_series_accumulate_(const at::Tensor& w, const at::Tensor& eps, const at::Tensor& logdet,
                               const std::optional<at::Tensor>& neumann, double logdet_coeff, double neumann_coeff,
                               int64_t sms, const std::optional<at::Tensor>& scale) {
  cu::logdet_series_accumulate_on(backend(sms), w, eps, logdet, neumann, logdet_coeff, neumann_coeff, scale);
}

void moments_(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& mean_square) {
  cu::moments_on(backend(1), x, mean, mean_square);
}

std::vector<at::Tensor> foreach_add_scaled(at::TensorList a, at::TensorList b, const at::Tensor& scale,
                                           int64_t sms) {
  return cu::foreach_add_scaled_on(backend(sms), a, b, scale);
}

std::tuple<at::Tensor, at::Tensor> actnorm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                           const std::optional<at::Tensor>& logp, int64_t sign, int64_t sms) {
  return cu::actnorm_on(backend(sms), x, weight, bias, logp, sign);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_backward(const at::Tensor& grad_y,
                                                                const std::optional<at::Tensor>& grad_logp,
                                                                const at::Tensor& x, const at::Tensor& weight,
                                                                const at::Tensor& bias, int64_t sign) {
  return cu::actnorm_backward_on(backend(1), grad_y, grad_logp, x, weight, bias, sign);
}

// The fused dense block's kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jacobian_lipswish(const at::Tensor& z,
                                                                             const std::optional<at::Tensor>& bias,
                                                                             const at::Tensor& beta, int64_t batch,
                                                                             bool keep, int64_t sms) {
  return cu::jacobian_lipswish_on(backend(sms), z, bias, beta, batch, keep);
}

std::tuple<at::Tensor, at::Tensor> jacobian_lipswish_backward(const at::Tensor& grad, const at::Tensor& h,
                                                              const at::Tensor& tangent, const at::Tensor& beta,
                                                              int64_t sms) {
  return cu::jacobian_lipswish_backward_on(backend(sms), grad, h, tangent, beta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jacobian_series(const at::Tensor& z,
                                                                           const std::optional<at::Tensor>& bias,
                                                                           const at::Tensor& eps,
                                                                           at::ArrayRef<double> logdet_coeffs,
                                                                           at::ArrayRef<double> neumann_coeffs,
                                                                           int64_t sms) {
  return cu::jacobian_series_on(backend(sms), z, bias, eps, logdet_coeffs, neumann_coeffs);
}

at::Tensor jacobian_series_backward(const at::Tensor& z, const at::Tensor& eps, at::ArrayRef<double> logdet_coeffs,
                                    const at::Tensor& grad_logdet, const at::Tensor& grad_g, int64_t sms) {
  return cu::jacobian_series_backward_on(backend(sms), z, eps, logdet_coeffs, grad_logdet, grad_g);
}

void lipschitz_normalize_(at::TensorList weights, at::TensorList us, at::TensorList vs, at::ArrayRef<double> coeffs,
                          at::TensorList out, const at::Tensor& sigmas, at::TensorList scales) {
  cu::lipschitz_normalize_on(backend(1), weights, us, vs, coeffs, out, sigmas, scales);
}

std::vector<at::Tensor> lipschitz_normalize_backward(at::TensorList grads, at::TensorList weights, at::TensorList us,
                                                     at::TensorList vs, const at::Tensor& sigmas,
                                                     at::ArrayRef<double> coeffs, const c10::List<bool>& detach_sigma) {
  return cu::lipschitz_normalize_backward_on(backend(1), grads, weights, us, vs, sigmas, coeffs, detach_sigma);
}

// The series launch plan for rows x cols elements of `element_size` bytes: [vec, blocks, warp per row].
std::vector<int64_t> series_plan(int64_t rows, int64_t cols, int64_t sms, bool aligned, int64_t element_size) {
  cu::SeriesPlan plan{};
  switch (element_size) {
    case 2: plan = cu::plan_series<uint16_t>(rows, cols, static_cast<int>(sms), aligned); break;
    case 4: plan = cu::plan_series<float>(rows, cols, static_cast<int>(sms), aligned); break;
    case 8: plan = cu::plan_series<double>(rows, cols, static_cast<int>(sms), aligned); break;
    default: TORCH_CHECK(false, "resflow_emulated.series_plan: element_size must be 2, 4 or 8");
  }
  return {plan.vec, plan.blocks, plan.warp_rows ? 1 : 0};
}

// The elementwise launch plan for n elements of `element_size` bytes: [vec, blocks, threads].
std::vector<int64_t> elementwise_plan(int64_t n, int64_t sms, bool aligned, int64_t element_size) {
  cu::ElementwisePlan plan{};
  switch (element_size) {
    case 2: plan = cu::plan_elementwise<uint16_t>(n, static_cast<int>(sms), aligned); break;
    case 4: plan = cu::plan_elementwise<float>(n, static_cast<int>(sms), aligned); break;
    case 8: plan = cu::plan_elementwise<double>(n, static_cast<int>(sms), aligned); break;
    default: TORCH_CHECK(false, "resflow_emulated.elementwise_plan: element_size must be 2, 4 or 8");
  }
  return {plan.vec, plan.blocks, plan.threads};
}

// The fused power-iteration plan for `batch` m x n matrices of `element_size` bytes (computing in
// that type): [blocks, threads, dynamic shared bytes, fits].
std::vector<int64_t> power_iteration_plan(int64_t batch, int64_t m, int64_t n, int64_t max_shared_bytes, int64_t sms,
                                          int64_t element_size) {
  TORCH_CHECK(element_size == 4 || element_size == 8,
              "resflow_emulated.power_iteration_plan: element_size must be 4 or 8");
  const auto plan = element_size == 4
                        ? cu::plan_power_iteration<float, float>(batch, m, n, max_shared_bytes, static_cast<int>(sms))
                        : cu::plan_power_iteration<double, double>(batch, m, n, max_shared_bytes, static_cast<int>(sms));
  return {plan.blocks, plan.threads, static_cast<int64_t>(plan.shared_bytes), plan.fits ? 1 : 0};
}

// [the static shared bytes the power-iteration plan reserves, the largest W it sends to one block].
std::vector<int64_t> power_iteration_limits() {
  return {static_cast<int64_t>(cu::kPowerIterationStaticSharedBytes), static_cast<int64_t>(cu::kFusedMaxMatrixBytes)};
}

// Kernel launches completed in this process so far.
int64_t launch_count() {
  return resflow_emu::launch_count();
}

// Forgets the launches so far (the kernels' list and the count), so that a test sees only its own: the
// conftest calls it before every emulated test.
void reset_launches() {
  resflow_emu::launched_kernels().clear();
  resflow_emu::launch_count() = 0;
}

// Static shared bytes of the last emulated launch (cudaFuncAttributes::sharedSizeBytes on a GPU).
int64_t last_static_shared_bytes() {
  return static_cast<int64_t>(resflow_emu::last_static_shared_bytes());
}

// Names (without namespace or template arguments) of every kernel launched in this process.
std::vector<std::string> launched_kernels() {
  std::vector<std::string> names;
  for (const void* kernel : resflow_emu::launched_kernels()) {
    Dl_info info;
    if (dladdr(kernel, &info) == 0 || info.dli_sname == nullptr) {
      names.emplace_back("<unknown>");
      continue;
    }
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 ? demangled : info.dli_sname;
    std::free(demangled);
    // "void ns::name<args>(params)" -> "name"
    const size_t open = name.find_first_of("<(");
    name = name.substr(0, open);
    const size_t colon = name.rfind("::");
    const size_t space = name.rfind(' ');
    const size_t start = colon != std::string::npos ? colon + 2 : (space != std::string::npos ? space + 1 : 0);
    names.push_back(name.substr(start));
  }
  return names;
}

// Probe kernels: `which` names one; threads and blocks set the launch.
at::Tensor probe(const std::string& which, int64_t blocks, int64_t threads, int64_t width) {
  namespace p = resflow_emu_probe;
  if (which == "intrinsics") {
    at::Tensor out = at::empty({threads * 10}, at::TensorOptions().dtype(at::kInt));
    const auto kernel = &p::intrinsics_kernel;
    RESFLOW_LAUNCH(kernel, blocks, threads, 0, nullptr)(out.mutable_data_ptr<int>(), static_cast<int>(width));
    return out;
  }
  if (which == "atomics") {
    // ints[0..6], then the float and the double sums, all as float64.
    at::Tensor ints = at::zeros({7}, at::TensorOptions().dtype(at::kInt));
    at::Tensor floats = at::zeros({1}, at::TensorOptions().dtype(at::kFloat));
    at::Tensor doubles = at::zeros({1}, at::TensorOptions().dtype(at::kDouble));
    const auto kernel = &p::atomics_kernel;
    RESFLOW_LAUNCH(kernel, blocks, threads, 0, nullptr)(ints.mutable_data_ptr<int>(), floats.mutable_data_ptr<float>(),
                                                         doubles.mutable_data_ptr<double>());
    return at::cat({ints.to(at::kDouble), floats.to(at::kDouble), doubles});
  }
  at::Tensor out = at::zeros({blocks * threads}, at::TensorOptions().dtype(at::kInt));
  int* o = out.mutable_data_ptr<int>();
  if (which == "dynamic_shared") {
    const auto kernel = &p::dynamic_shared_kernel;
    RESFLOW_LAUNCH(kernel, blocks, threads, threads * sizeof(float), nullptr)(o);
  } else if (which == "static_shared_fits" || which == "static_shared_overflow") {
    // 1 KiB static plus 47 KiB (fits) or 47 KiB + 4 bytes (does not) of dynamic shared memory.
    const size_t dynamic = 47 * 1024 + (which == "static_shared_overflow" ? 4 : 0);
    const auto kernel = &p::static_shared_kernel;
    RESFLOW_LAUNCH(kernel, blocks, threads, dynamic, nullptr)(o);
  } else if (which == "divergent_barrier") {
    const auto kernel = &p::divergent_barrier_kernel;
    RESFLOW_LAUNCH(kernel, blocks, threads, 0, nullptr)(o);
  } else if (which == "warp_facing_barrier") {
    const auto kernel = &p::warp_facing_barrier_kernel;
    RESFLOW_LAUNCH(kernel, blocks, threads, 0, nullptr)(o);
  } else if (which == "absent_lane") {
    const auto kernel = &p::absent_lane_kernel;
    RESFLOW_LAUNCH(kernel, blocks, threads, 0, nullptr)(o);
  } else if (which == "exited_lane") {
    const auto kernel = &p::exited_lane_kernel;
    RESFLOW_LAUNCH(kernel, blocks, threads, 0, nullptr)(o);
  } else {
    TORCH_CHECK(false, "resflow_emulated.probe: unknown probe '", which, "'");
  }
  return out;
}

// The planted-race kernel (with_barrier=false) and its correct twin, on 128-element blocks.
at::Tensor shared_reverse(const at::Tensor& x, bool with_barrier) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() % 128 == 0,
              "resflow_emulated.shared_reverse: expected a contiguous float32 tensor of 128·k elements");
  at::Tensor y = at::empty_like(x);
  const int blocks = static_cast<int>(x.numel() / 128);
  if (with_barrier) {
    const auto kernel = &resflow_emu_probe::shared_reverse_kernel<true>;
    RESFLOW_LAUNCH(kernel, blocks, 128, 0, nullptr)(x.const_data_ptr<float>(), y.mutable_data_ptr<float>());
  } else {
    const auto kernel = &resflow_emu_probe::shared_reverse_kernel<false>;
    RESFLOW_LAUNCH(kernel, blocks, 128, 0, nullptr)(x.const_data_ptr<float>(), y.mutable_data_ptr<float>());
  }
  return y;
}

// The sanitizer this extension was compiled with ("thread", "address" or "").
std::string sanitizer() {
#if defined(RESFLOW_EMU_TSAN)
  return "thread";
#elif defined(RESFLOW_EMU_ASAN)
  return "address";
#else
  return "";
#endif
}

}  // namespace

TORCH_LIBRARY(resflow_emulated, m) {
  m.def("lipswish(Tensor x, Tensor beta, int sm_count) -> Tensor");
  m.def("lipswish_with_derivative(Tensor x, Tensor beta, int sm_count) -> (Tensor, Tensor)");
  m.def("lipswish_backward(Tensor grad, Tensor x, Tensor beta, int sm_count) -> (Tensor, Tensor)");
  m.def("lipswish_double_backward(Tensor grad, Tensor gg_x, Tensor gg_beta, Tensor x, Tensor beta, int sm_count) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("elementwise_plan(int n, int sm_count, bool aligned, int element_size) -> int[]", &elementwise_plan);
  m.def("series_plan(int rows, int cols, int sm_count, bool aligned, int element_size) -> int[]", &series_plan);
  m.def("logdet_series_accumulate_(Tensor(c!) w, Tensor eps, Tensor(a!) logdet, Tensor(b!)? neumann, "
        "float logdet_coeff, float neumann_coeff, int sm_count, Tensor? scale=None) -> ()");
  m.def("moments_(Tensor x, Tensor(a!) mean, Tensor(b!) mean_square) -> ()");
  m.def("foreach_add_scaled(Tensor[] a, Tensor[] b, Tensor scale, int sm_count) -> Tensor[]");
  m.def("actnorm(Tensor x, Tensor weight, Tensor bias, Tensor? logp, int sign, int sm_count) -> (Tensor, Tensor)");
  m.def("actnorm_backward(Tensor grad_y, Tensor? grad_logp, Tensor x, Tensor weight, Tensor bias, int sign) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("jacobian_lipswish(Tensor z, Tensor? bias, Tensor beta, int batch, bool keep, int sm_count) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("jacobian_lipswish_backward(Tensor grad, Tensor h, Tensor tangent, Tensor beta, int sm_count) "
        "-> (Tensor, Tensor)");
  m.def("jacobian_series(Tensor z, Tensor? bias, Tensor eps, float[] logdet_coeffs, float[] neumann_coeffs, "
        "int sm_count) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("jacobian_series_backward(Tensor z, Tensor eps, float[] logdet_coeffs, Tensor grad_logdet, Tensor grad_g, "
        "int sm_count) -> Tensor");
  m.def("lipschitz_normalize_(Tensor[] weights, Tensor[] us, Tensor[] vs, float[] coeffs, Tensor(a!)[] out, "
        "Tensor(b!) sigmas, Tensor(c!)[] scales) -> ()");
  m.def("lipschitz_normalize_backward(Tensor[] grads, Tensor[] weights, Tensor[] us, Tensor[] vs, Tensor sigmas, "
        "float[] coeffs, bool[] detach_sigma) -> Tensor[]");
  m.def("launched_kernels() -> str[]", &launched_kernels);
  m.def("power_iteration_plan(int batch, int m, int n, int max_shared_bytes, int sm_count, int element_size) -> int[]",
        &power_iteration_plan);
  m.def("power_iteration_limits() -> int[]", &power_iteration_limits);
  m.def("last_static_shared_bytes() -> int", &last_static_shared_bytes);
  m.def("launch_count() -> int", &launch_count);
  m.def("reset_launches() -> ()", &reset_launches);
  m.def("probe(str which, int blocks, int threads, int width) -> Tensor", &probe);
  m.def("shared_reverse(Tensor x, bool with_barrier) -> Tensor");
  m.def("sanitizer() -> str", &sanitizer);
  m.def("power_iteration(Tensor weight, Tensor u, Tensor v, int max_iterations, float? atol, float? rtol, "
        "float domain, float codomain, bool u_first, int max_shared_bytes) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("conv_power_iteration(Tensor weight, Tensor u, Tensor v, int[2] input_size, int[2] stride, int[2] padding, "
        "int max_iterations, float? atol, float? rtol, float domain, float codomain, bool u_first) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("power_iteration_update_(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, Tensor(c!)[] sigmas, "
        "int max_iterations, float? atol, float? rtol, float domain, float codomain, bool u_first) -> ()");
}

TORCH_LIBRARY_IMPL(resflow_emulated, CPU, m) {
  m.impl("lipswish", &lipswish);
  m.impl("lipswish_with_derivative", &lipswish_with_derivative);
  m.impl("lipswish_backward", &lipswish_backward);
  m.impl("lipswish_double_backward", &lipswish_double_backward);
  m.impl("shared_reverse", &shared_reverse);
  m.impl("power_iteration", &power_iteration);
  m.impl("conv_power_iteration", &conv_power_iteration);
  m.impl("power_iteration_update_", &power_iteration_update_);
  m.impl("logdet_series_accumulate_", &logdet_series_accumulate_);
  m.impl("moments_", &moments_);
  m.impl("foreach_add_scaled", &foreach_add_scaled);
  m.impl("actnorm", &actnorm);
  m.impl("actnorm_backward", &actnorm_backward);
  m.impl("jacobian_lipswish", &jacobian_lipswish);
  m.impl("jacobian_lipswish_backward", &jacobian_lipswish_backward);
  m.impl("jacobian_series", &jacobian_series);
  m.impl("jacobian_series_backward", &jacobian_series_backward);
  m.impl("lipschitz_normalize_", &lipschitz_normalize_);
  m.impl("lipschitz_normalize_backward", &lipschitz_normalize_backward);
}
