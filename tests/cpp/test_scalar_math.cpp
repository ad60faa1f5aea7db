// Host-only checks of the torch-free math headers (no torch, no GPU): LipSwish's derivatives
// against central finite differences in long double, the stable sigmoid against the naive one,
// and finiteness for extreme arguments. Built and run by CMake (ctest).
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <limits>

#include "resflow/lipswish_math.h"

namespace m = resflow_cuda::math;

namespace {

int failures = 0;

void expect_close(const char* what, double got, double want, double rtol, double atol, double x, double b) {
  if (!(std::fabs(got - want) <= atol + rtol * std::fabs(want))) {
    std::printf("FAIL %s at x=%g b=%g: got %.17g, want %.17g\n", what, x, b, got, want);
    ++failures;
  }
}

using Point = m::LipSwishPoint<m::ScalarOps, double>;

double f(double x, double b) { return Point(x, m::lipswish_params(b).beta).value(); }

// First derivative by a central difference of step h (error O(h²)).
template <class F>
double diff(F fn, double at, double h) {
  return (fn(at + h) - fn(at - h)) / (2 * h);
}

void check_derivatives(double x, double b) {
  const auto p = m::lipswish_params(b);
  const Point pt(x, p.beta);
  const double h = 1e-5;
  const double scale = 1 + std::fabs(x);
  // x-derivatives
  expect_close("f_x", pt.d_x(), diff([&](double u) { return f(u, b); }, x, h), 1e-7, 1e-9, x, b);
  expect_close("f_xx", p.beta * pt.q(), diff([&](double u) { return Point(u, p.beta).d_x(); }, x, h), 1e-6, 1e-8, x, b);
  // beta-derivatives (through softplus): f_b = f_β β', f_xb = f_xβ β', f_bb = f_ββ β'² + f_β β''
  expect_close("f_b", pt.d_beta() * p.dbeta, diff([&](double c) { return f(x, c); }, b, h), 1e-7, 1e-9 * scale, x, b);
  expect_close("f_xb", x * pt.q() * p.dbeta,
               diff([&](double c) { return Point(x, m::lipswish_params(c).beta).d_x(); }, b, h), 1e-6, 1e-8 * scale, x, b);
  const double f_bb = pt.d_beta_beta() * p.dbeta * p.dbeta + pt.d_beta() * p.d2beta;
  expect_close("f_bb", f_bb,
               diff([&](double c) {
                      const auto pc = m::lipswish_params(c);
                      return Point(x, pc.beta).d_beta() * pc.dbeta;
                    },
                    b, h),
               1e-6, 1e-8 * scale * scale, x, b);
}

void check_value(double x, double b) {
  // The forward-only formula against the point's value and a long-double evaluation.
  const double beta = m::lipswish_params(b).beta;
  const long double want = x / (1.0L + std::exp(-static_cast<long double>(beta) * x)) / 1.1L;
  // exp amplifies the rounding of z = βx: its relative error is about |z| ulps.
  const double rtol = 4e-16 * (4 + std::fabs(beta * x));
  expect_close("lipswish_value", m::lipswish_value<m::ScalarOps>(x, beta), static_cast<double>(want), rtol, 1e-300, x, b);
  expect_close("point value", Point(x, beta).value(), static_cast<double>(want), rtol, 1e-300, x, b);
}

void check_element_functions(double x, double b) {
  // The backward / double-backward element functions against the derivatives they combine.
  const auto p = m::lipswish_params(b);
  const Point pt(x, p.beta);
  const double g = 0.7, h = -1.3, k = 0.4;
  double gb = 0;
  const double gx = m::lipswish_backward_element<m::ScalarOps>(g, x, p.beta, p.dbeta, gb);
  expect_close("backward grad_x", gx, g * pt.d_x(), 1e-14, 1e-300, x, b);
  expect_close("backward grad_b", gb, g * pt.d_beta() * p.dbeta, 1e-14, 1e-300, x, b);
  double gg = 0, gx2 = 0, gb2 = 0;
  m::lipswish_double_backward_element<m::ScalarOps>(g, h, x, k, p.beta, p.dbeta, p.d2beta, gg, gx2, gb2);
  const double f_b = pt.d_beta() * p.dbeta, f_xb = x * pt.q() * p.dbeta, f_xx = p.beta * pt.q();
  const double f_bb = pt.d_beta_beta() * p.dbeta * p.dbeta + pt.d_beta() * p.d2beta;
  expect_close("double backward grad_grad", gg, h * pt.d_x() + k * f_b, 1e-13, 1e-300, x, b);
  expect_close("double backward grad_x", gx2, g * (h * f_xx + k * f_xb), 1e-13, 1e-300, x, b);
  expect_close("double backward grad_b", gb2, g * (h * f_xb + k * f_bb), 1e-12, 1e-300, x, b);
}

void check_sigmoid() {
  for (double z = -700; z <= 700; z += 0.37) {
    const auto sp = m::sigmoid_parts<m::ScalarOps>(z);
    const long double s = 1.0L / (1.0L + std::exp(-static_cast<long double>(z)));
    expect_close("sigmoid", sp.s, static_cast<double>(s), 1e-15, 1e-300, z, 0);
    expect_close("1 - sigmoid", sp.sc, static_cast<double>(1.0L / (1.0L + std::exp(static_cast<long double>(z)))),
                 1e-15, 1e-300, z, 0);
  }
}

void check_extremes() {
  const float big = std::numeric_limits<float>::max();
  for (float x : {-big, -1e30f, -1e19f, -100.f, 100.f, 1e19f, 1e30f, big}) {
    const m::LipSwishPoint<m::ScalarOps, float> pt(x, m::lipswish_params(0.5f).beta);
    const float value = m::lipswish_value<m::ScalarOps>(x, m::lipswish_params(0.5f).beta);
    for (float v : {value, pt.value(), pt.d_x(), pt.d_beta(), pt.q(), pt.d_beta_beta()}) {
      if (!std::isfinite(v)) {
        std::printf("FAIL non-finite derivative at x=%g\n", x);
        ++failures;
      }
    }
  }
  // Softplus follows torch's threshold: linear above 20, with derivatives 1 and 0.
  const auto p = m::lipswish_params(25.0);
  expect_close("softplus above threshold", p.beta, 25.0, 0, 0, 0, 25);
  expect_close("softplus' above threshold", p.dbeta, 1.0, 0, 0, 0, 25);
  expect_close("softplus'' above threshold", p.d2beta, 0.0, 0, 0, 0, 25);
}

}  // namespace

int main() {
  for (double b : {-3.0, -0.5, 0.5, 2.0, 19.0}) {
    for (double x : {-40.0, -7.5, -2.0, -0.3, 0.0, 0.3, 1.0, 4.0, 12.0, 40.0}) {
      check_derivatives(x, b);
      check_value(x, b);
      check_element_functions(x, b);
    }
  }
  check_sigmoid();
  check_extremes();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "ok", failures);
  return failures == 0 ? 0 : 1;
}
