"""LipSwish ops against the pure-PyTorch reference (autograd of it for every derivative)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import resflow_cuda
from resflow_cuda import ops, reference
from resflow_cuda._extension import _C

from conftest import TOLERANCES
from samples import lipswish_samples, sample_ids

SAMPLES = lipswish_samples()
SMALL_F64 = [s for s in lipswish_samples([torch.float64]) if 0 < s.x.numel() <= 200 and not s.id.startswith("large")]


# ----------------------------------------------------------------------------------------------
# Ground truth: autograd of the float64 reference.
# ----------------------------------------------------------------------------------------------


def _ref(x, beta):
    """The reference with x's shape (it broadcasts a 0-dim x with the [1]-shaped beta to [1])."""
    return reference.lipswish(x, beta).reshape(x.shape)


def _f64(*ts):
    return [t.detach().double() for t in ts]


def _elementwise_derivatives(x, beta):
    """Per-element f_x, f_b, f_xx, f_xb, f_bb of the float64 reference, by torch.func."""
    x, beta = _f64(x, beta)

    def f(x_, b_):
        return _ref(x_, b_)

    def f_x(x_, b_):
        return torch.func.grad(lambda u: f(u, b_).sum())(x_)

    def along_b(fn, x_, b_):
        return torch.func.jvp(lambda b: fn(x_, b), (b_,), (torch.ones_like(b_),))[1]

    def f_b(x_, b_):
        return along_b(f, x_, b_)

    return dict(
        f_x=f_x(x, beta),
        f_b=f_b(x, beta),
        f_xx=torch.func.grad(lambda u: f_x(u, beta).sum())(x),
        f_xb=along_b(f_x, x, beta),
        f_bb=along_b(f_b, x, beta),
    )


def _truth_backward(grad, x, beta):
    grad, x, beta = _f64(grad, x, beta)
    x.requires_grad_(True)
    beta.requires_grad_(True)
    gx, gb = torch.autograd.grad(_ref(x, beta), (x, beta), grad)
    return gx, gb


def _truth_double_backward(grad, gg_x, gg_beta, x, beta):
    grad, gg_x, gg_beta, x, beta = _f64(grad, gg_x, gg_beta, x, beta)
    for t in (grad, x, beta):
        t.requires_grad_(True)
    gx, gb = torch.autograd.grad(_ref(x, beta), (x, beta), grad, create_graph=True)
    return torch.autograd.grad((gx, gb), (grad, x, beta), (gg_x, gg_beta), allow_unused=True)


def _assert_close(actual, expected, dtype, scale=None):
    """Elementwise tolerance of the dtype; for sums (grad_beta) the absolute tolerance is scaled
    by the sum of the terms' magnitudes, since cancellation can make the total tiny (float64: rtol
    1e-10 covers the worst case 2 n 2^-53 of two summation orders for n <= 4e5 terms)."""
    tol = dict(TOLERANCES[dtype])
    if scale is not None:
        tol["atol"] = tol["rtol"] * float(scale) + tol["atol"]
    assert_close(actual.double(), expected.double(), **tol)


def _expected_strides(*operands):
    first = operands[0]
    return torch.empty(first.shape, memory_format=resflow_cuda.ops._elementwise_format(*operands)).stride()


def _randn_like(x, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------------------------
# Values against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("sample", SAMPLES, ids=sample_ids(SAMPLES))
def test_forward_matches_reference(sample, device):
    s = sample.to(device)
    y = ops.lipswish(s.x, s.beta)
    assert y.dtype == s.x.dtype and y.shape == s.x.shape and y.device == s.x.device
    assert y.stride() == _expected_strides(s.x)
    _assert_close(y, _ref(*_f64(s.x, s.beta)), s.x.dtype)
    assert torch.isfinite(y).all()


@pytest.mark.parity
@pytest.mark.parametrize("sample", SAMPLES, ids=sample_ids(SAMPLES))
def test_forward_with_derivative(sample, device):
    s = sample.to(device)
    y, dydx = ops.lipswish_with_derivative(s.x, s.beta)
    d = _elementwise_derivatives(s.x, s.beta)
    assert dydx.dtype == s.x.dtype and dydx.stride() == _expected_strides(s.x)
    _assert_close(y, _ref(*_f64(s.x, s.beta)), s.x.dtype)
    _assert_close(dydx, d["f_x"], s.x.dtype)
    assert torch.isfinite(dydx).all()


@pytest.mark.parity
@pytest.mark.parametrize("sample", SAMPLES, ids=sample_ids(SAMPLES))
def test_backward_matches_autograd(sample, device):
    s = sample.to(device)
    grad = _randn_like(s.x, 1)
    grad_x, grad_beta = ops.lipswish_backward(grad, s.x, s.beta)
    exp_x, exp_beta = _truth_backward(grad, s.x, s.beta)
    d = _elementwise_derivatives(s.x, s.beta)
    assert grad_x.stride() == _expected_strides(grad, s.x)
    assert grad_beta.shape == s.beta.shape and grad_beta.dtype == s.beta.dtype
    _assert_close(grad_x, exp_x, s.x.dtype)
    _assert_close(grad_beta, exp_beta, s.x.dtype, scale=(grad.double().abs() * d["f_b"].abs()).sum())
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_beta).all()


@pytest.mark.parity
@pytest.mark.parametrize("sample", SAMPLES, ids=sample_ids(SAMPLES))
def test_double_backward_matches_autograd(sample, device):
    s = sample.to(device)
    grad, gg_x = _randn_like(s.x, 2), _randn_like(s.x, 3)
    gg_beta = torch.full_like(s.beta, -0.75)
    out = ops.lipswish_double_backward(grad, gg_x, gg_beta, s.x, s.beta)
    expected = _truth_double_backward(grad, gg_x, gg_beta, s.x, s.beta)
    d = _elementwise_derivatives(s.x, s.beta)
    g, h, k = grad.double().abs(), gg_x.double().abs(), 0.75
    for t in out[:2]:
        assert t.stride() == _expected_strides(grad, gg_x, s.x)
    _assert_close(out[0], expected[0], s.x.dtype)
    _assert_close(out[1], expected[1], s.x.dtype)
    _assert_close(out[2], expected[2], s.x.dtype, scale=(g * (h * d["f_xb"].abs() + k * d["f_bb"].abs())).sum())
    assert all(torch.isfinite(t).all() for t in out)


def test_large_inputs_have_finite_derivatives(device):
    # |x| up to the float32 limit: y, f', f'' and the beta terms stay finite (t-first products).
    x = torch.tensor([-3e38, -1e30, -1e19, 1e19, 1e30, 3e38], device=device)
    beta = torch.tensor([0.5], device=device)
    y, dydx = ops.lipswish_with_derivative(x, beta)
    one = torch.ones_like(x)
    gx, gb = ops.lipswish_backward(one, x, beta)
    out = ops.lipswish_double_backward(one, one, torch.ones_like(beta), x, beta)
    for t in (y, dydx, gx, gb, *out):
        assert torch.isfinite(t).all(), t
    assert_close(y, torch.where(x > 0, x / 1.1, torch.zeros_like(x)))
    assert_close(dydx, torch.where(x > 0, 1 / 1.1, 0.0))
    # an upstream gradient of ones: grad_x is f' itself (the same float32 formula, so equal up to float32 rounding)
    assert_close(gx, torch.where(x > 0, 1 / 1.1, 0.0))


@pytest.mark.parity
def test_nan_propagates(device):
    x = torch.tensor([0.3, float("nan"), -2.0, float("inf"), float("-inf")], device=device)
    beta = torch.tensor([0.5], device=device)
    y, dydx = ops.lipswish_with_derivative(x, beta)
    assert torch.isnan(y[1]) and torch.isnan(dydx[1])
    assert torch.isfinite(y[[0, 2]]).all()
    # ±inf follow the reference: inf·σ(inf) = inf, −inf·σ(−inf) = −inf·0 = nan.
    assert_close(y, reference.lipswish(x, beta), equal_nan=True)
    _, grad_beta = ops.lipswish_backward(torch.ones_like(x), x, beta)
    assert torch.isnan(grad_beta).all()
    y_nan_beta = ops.lipswish(x[[0, 2]], torch.tensor([float("nan")], device=device))
    assert torch.isnan(y_nan_beta).all()


# ----------------------------------------------------------------------------------------------
# Autograd: first and second order, gradcheck / gradgradcheck in float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", SMALL_F64, ids=sample_ids(SMALL_F64))
def test_gradcheck_and_gradgradcheck(sample, device):
    s = sample.to(device)
    x = s.x.detach().clone().requires_grad_(True)
    beta = s.beta.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(ops.lipswish, (x, beta))
    assert torch.autograd.gradgradcheck(ops.lipswish, (x, beta))
    assert torch.autograd.gradcheck(ops.lipswish_with_derivative, (x, beta))
    grad = _randn_like(s.x, 4).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.lipswish_backward, (grad, x, beta))


@pytest.mark.parity
def test_autograd_matches_reference_autograd(device):
    x0 = torch.randn(64, 9, dtype=torch.float64, device=device)
    b0 = torch.tensor([0.2], dtype=torch.float64, device=device)
    results = []
    for fn in (ops.lipswish, reference.lipswish):
        x = x0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        y = fn(x, b)
        (gx, gb) = torch.autograd.grad((y * y.detach().cos()).sum(), (x, b), create_graph=True)
        hx, hb = torch.autograd.grad((gx.sin().sum() + gb.sum() ** 2), (x, b))
        results.append((y, gx, gb, hx, hb))
    # float64: elementwise closed forms vs autograd of the twin (a few ulps); gb, hb sum 576 terms in another order,
    # <= 576*2^-53*sum|terms| ~ 2.5e-12 at worst (sum|terms| ~ 40 ~ |gb|), under rtol |gb|
    for ours, ref in zip(*results):
        assert_close(ours, ref, atol=1e-12, rtol=1e-10)


def test_third_order_is_refused():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(ops.lipswish(x, b).sum(), x, create_graph=True)
    (hx,) = torch.autograd.grad(gx.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="up to second order"):
        torch.autograd.grad(hx.sum(), x)


# ----------------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, autograd registration, AOT dispatch) on every sample
# ----------------------------------------------------------------------------------------------

OPCHECK_SAMPLES = SAMPLES


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=sample_ids(OPCHECK_SAMPLES))
def test_opcheck(sample):
    x, beta = sample.x, sample.beta
    with_grad = x.dtype in (torch.float32, torch.float64)
    xg = x.detach().clone().requires_grad_(with_grad) if with_grad else x
    bg = beta.detach().clone().requires_grad_(with_grad) if with_grad else beta
    grad, gg_x = _randn_like(x, 5), _randn_like(x, 6)
    torch.library.opcheck(torch.ops.resflow_cuda.lipswish.default, (xg, bg))
    torch.library.opcheck(torch.ops.resflow_cuda.lipswish_with_derivative.default, (xg, bg))
    torch.library.opcheck(torch.ops.resflow_cuda.lipswish_backward.default, (grad, xg, bg))
    torch.library.opcheck(torch.ops.resflow_cuda.lipswish_double_backward.default,
                          (grad, gg_x, torch.ones_like(beta), x, beta))


# ----------------------------------------------------------------------------------------------
# CPU kernel sets, determinism
# ----------------------------------------------------------------------------------------------


def _supported_capabilities():
    order = ["default", "avx2", "avx512"]
    best = resflow_cuda.build_info()["cpu_capability"]
    return [c for c in resflow_cuda.build_info()["cpu_capabilities"] if order.index(c) <= order.index(best)]


@pytest.mark.parity
@pytest.mark.parametrize("capability", _supported_capabilities())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_every_cpu_kernel_set_matches_reference(capability, dtype):
    x = (3 * torch.randn(3 * 2**14 + 77, dtype=torch.float64)).to(dtype)
    beta = torch.tensor([0.3], dtype=dtype)
    grad, gg_x = _randn_like(x, 7), _randn_like(x, 8)
    gg_beta = torch.tensor([0.4], dtype=dtype)
    try:
        _C._set_cpu_capability(capability)
        assert _C.cpu_capability() == capability
        y, dydx = ops.lipswish_with_derivative(x, beta)
        gx, gb = ops.lipswish_backward(grad, x, beta)
        dbl = ops.lipswish_double_backward(grad, gg_x, gg_beta, x, beta)
    finally:
        _C._set_cpu_capability("")
    d = _elementwise_derivatives(x, beta)
    _assert_close(y, _ref(*_f64(x, beta)), dtype)
    _assert_close(dydx, d["f_x"], dtype)
    exp_x, exp_b = _truth_backward(grad, x, beta)
    _assert_close(gx, exp_x, dtype)
    _assert_close(gb, exp_b, dtype, scale=(grad.double().abs() * d["f_b"].abs()).sum())
    expected = _truth_double_backward(grad, gg_x, gg_beta, x, beta)
    _assert_close(dbl[0], expected[0], dtype)
    _assert_close(dbl[1], expected[1], dtype)


def test_capability_override_refuses_unknown_names():
    with pytest.raises(RuntimeError, match="expected one of the compiled capabilities"):
        _C._set_cpu_capability("sse9")
    assert _C.cpu_capability() == resflow_cuda.build_info()["cpu_capability"]


def test_grad_beta_does_not_depend_on_thread_count():
    x = torch.randn(5 * 2**14 + 3)
    grad = torch.randn_like(x)
    beta = torch.tensor([0.5])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one = ops.lipswish_backward(grad, x, beta)
        torch.set_num_threads(max(2, threads))
        _, many = ops.lipswish_backward(grad, x, beta)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_integer_x_is_refused():
    with pytest.raises(RuntimeError, match=r"expected x to have a floating-point dtype .* but got Long"):
        ops.lipswish(torch.arange(4), torch.tensor([0.5]))


@pytest.mark.parametrize("shape", [(2,), (1, 1), (0,)])
def test_beta_of_wrong_shape_is_refused(shape):
    with pytest.raises(RuntimeError, match=r"expected beta to have shape \[1\] \(or be 0-dimensional\), but got shape"):
        ops.lipswish(torch.randn(3), torch.zeros(shape))


def test_beta_of_other_dtype_is_refused_by_the_op():
    with pytest.raises(RuntimeError, match=r"expected beta to have the dtype of x \(Float\), but got Double"):
        ops.lipswish(torch.randn(3), torch.tensor([0.5], dtype=torch.float64))


def test_beta_on_other_device_is_refused():
    with pytest.raises(RuntimeError, match=r"expected beta to be on the device of x"):
        ops.lipswish(torch.randn(3), torch.tensor([0.5], device="meta"))


def test_grad_of_wrong_shape_is_refused():
    with pytest.raises(RuntimeError, match=r"expected grad to have the shape of x \[3\], but got \[4\]"):
        ops.lipswish_backward(torch.randn(4), torch.randn(3), torch.tensor([0.5]))


def test_gg_beta_of_wrong_shape_is_refused():
    x = torch.randn(3)
    with pytest.raises(RuntimeError, match=r"expected gg_beta to have shape \[1\]"):
        ops.lipswish_double_backward(x, x, torch.zeros(2), x, torch.tensor([0.5]))


def test_fake_kernel_refuses_what_the_kernel_refuses():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        with pytest.raises(RuntimeError, match=r"expected beta to have shape \[1\]"):
            ops.lipswish(torch.randn(3), torch.zeros(2))


@pytest.mark.skipif(resflow_cuda.has_cuda_kernels(), reason="checks the message of CPU-only builds")
def test_cuda_tensor_in_cpu_only_build_says_how_to_rebuild():
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match=r"no CUDA kernels .* RESFLOW_CUDA=1 pip install --no-build-isolation"):
        torch.ops.resflow_cuda.lipswish.default.redispatch(keyset, torch.randn(3), torch.tensor([0.5]))
