"""resflow_cuda.nn.LipSwish against the reference module (normflows' copy of residual-flows' Swish), and
the other activations of the references against their outputs (fixtures written by the references' code)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from normflows.nets.lipschitz import Swish as ReferenceSwish
from torch.testing import assert_close

import resflow_cuda
from resflow_cuda.nn import FullSort, Identity, LipSwish, MaxMin, Sin, Swish, Zero


def _pair(dtype=torch.float32, beta=0.5):
    ours, ref = LipSwish(), ReferenceSwish()
    with torch.no_grad():
        ours.beta.fill_(beta)
        ref.beta.fill_(beta)
    return ours.to(dtype), ref.to(dtype)


@pytest.mark.parity
def test_parameters_and_state_dict_match_the_reference():
    ours, ref = LipSwish(), ReferenceSwish()
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["beta"]
    assert ours.beta.shape == ref.beta.shape == (1,)
    assert ours.beta.dtype == ref.beta.dtype
    assert_close(ours.beta.detach(), ref.beta.detach())
    ours.load_state_dict(ReferenceSwish().state_dict())
    ref.load_state_dict(ours.state_dict())
    assert Swish is LipSwish


@pytest.mark.parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.5, -2.0, 3.0])
def test_output_and_gradients_match_the_reference(device, dtype, beta):
    ours, ref = _pair(dtype, beta)
    ours, ref = ours.to(device), ref.to(device)
    x0 = 2 * torch.randn(8, 5, 6, 7, dtype=dtype, device=device)
    grad = torch.randn_like(x0)
    x1, x2 = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    y1, y2 = ours(x1), ref(x2)
    y1.backward(grad)
    y2.backward(grad)
    # float64: elementwise closed forms vs normflows' eager ops, a few ulps of O(10) values; beta.grad sums 1680
    # terms in another order, ~sqrt(n)*2^-53*sum|terms| <= 1e-12 (sum|terms| <= 190, |beta.grad| >= 1.8 here).
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-5)
    assert_close(y1, y2, **tol)
    assert_close(x1.grad, x2.grad, **tol)
    assert_close(ours.beta.grad, ref.beta.grad, **tol)


@pytest.mark.parity
def test_second_order_gradients_match_the_reference(device):
    ours, ref = _pair(torch.float64, 0.3)
    ours, ref = ours.to(device), ref.to(device)
    x0 = torch.randn(32, 4, dtype=torch.float64, device=device)
    results = []
    for module in (ours, ref):
        x = x0.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
        gb = torch.autograd.grad((gx ** 2).sum(), [x, module.beta])
        results.append((gx, *gb))
    # float64: elementwise (a few ulps); the beta gradient sums 128 terms, <= 128*2^-53*14 ~ 2e-13 at worst
    for a, b in zip(*results):
        assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parity
def test_mixed_dtype_keeps_the_input_dtype():
    module = LipSwish()
    x = torch.randn(10, dtype=torch.bfloat16, requires_grad=True)
    y = module(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert module.beta.grad.dtype == torch.float32 and torch.isfinite(module.beta.grad).all()
    assert_close(y.float(), resflow_cuda.reference.lipswish(x.detach().float(), module.beta.detach()),
                 atol=1e-2, rtol=1.6e-2)


def test_functional_refuses_non_tensors():
    with pytest.raises(TypeError, match="expected beta to be a torch.Tensor"):
        resflow_cuda.functional.lipswish(torch.randn(3), 0.5)
    with pytest.raises(TypeError, match="expected x to be a torch.Tensor"):
        resflow_cuda.functional.lipswish([1.0], torch.tensor([0.5]))


def test_extra_repr():
    assert repr(LipSwish()) == "LipSwish(beta=0.5)"
    assert "beta=<meta>" in repr(LipSwish().to("meta"))


def test_compiled_model_has_no_graph_break_and_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), LipSwish(), torch.nn.Linear(16, 8), LipSwish())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(32, 8)
    y_eager = model(x)
    (g_eager,) = torch.autograd.grad(y_eager.square().sum(), model[1].beta)
    y_comp = compiled(x)
    (g_comp,) = torch.autograd.grad(y_comp.square().sum(), model[1].beta)
    assert_close(y_comp, y_eager)
    assert_close(g_comp, g_eager)


def test_lipschitz_cube_is_the_reference_piecewise_cube_and_1_lipschitz():
    from resflow_cuda.nn import LipschitzCube

    x = torch.linspace(-3, 3, 601, dtype=torch.float64, requires_grad=True)
    y = LipschitzCube()(x)
    expected = (x >= 1).to(x) * (x - 2 / 3) + (x <= -1).to(x) * (x + 2 / 3) + ((x > -1) & (x < 1)).to(x) * x**3 / 3
    torch.testing.assert_close(y, expected)  # float64, the same pieces: a few ulps (a wrong piece errs by >= 1e-2)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.max() <= 1 + 1e-12 and grad.min() >= 0  # exactly 1 outside (-1, 1), x^2 < 1 inside: rounding slack


# -- the reference's FullSort, MaxMin, Identity and ImpFlow's Sin, Zero ------------------------------
# Against tests/data/reference_toy_small.pt (make_reference_toy.py, residual-flows 8170138c850a) and
# tests/data/reference_implicit_toy_small.pt (make_reference_implicit_flow.py, ImpFlow d8babe48bdea), which
# hold the reference modules' outputs and gradients on inputs with ties, NaN and infinities. normflows has none
# of these modules.

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def residual_flows_activations():
    return torch.load(DATA / "reference_toy_small.pt")["activations"]


@pytest.fixture(scope="module")
def impflow_activations():
    return torch.load(DATA / "reference_implicit_toy_small.pt")["activations"]


def _run(module, case, device):
    x = case["x"].to(device).requires_grad_(True)
    y = module(x)
    (grad,) = torch.autograd.grad((y * case["w"].to(device)).sum(), x)
    return y.detach().cpu(), grad.cpu()


@pytest.mark.parity
@pytest.mark.parametrize("name, module", [("fullsort", FullSort), ("fullsort_images", FullSort), ("maxmin", MaxMin),
                                          ("identity", Identity)])
def test_sort_maxmin_identity_match_the_reference(residual_flows_activations, device, name, module):
    case = residual_flows_activations[name]
    y, grad = _run(module(), case, device)
    # Exact: outputs are copies of input entries (NaN where the reference has NaN) and gradients sums of w entries.
    assert_close(y, case["y"], atol=0, rtol=0, equal_nan=True)
    expected = case["grad"]
    if device != "cpu":
        # which of equal values torch.sort / max / min pick (and so where the gradient goes) is the CPU kernels'
        # choice, as in the reference run: compare the samples without ties only
        flat = case["x"].flatten(1)
        distinct = torch.tensor([row.unique().numel() == row.numel() for row in flat])
        grad, expected = grad[distinct], expected[distinct]
    assert_close(grad, expected, atol=0, rtol=0)
    assert not list(module().state_dict())


def test_sort_and_maxmin_are_permutations_with_their_documented_shapes():
    x = torch.randn(7, 6, dtype=torch.float64)
    y = FullSort()(x)
    assert (y[:, 1:] >= y[:, :-1]).all() and torch.equal(y.sort(1)[0], x.sort(1)[0])
    images = torch.randn(2, 5, 3, 3)
    assert torch.equal(FullSort()(images), images.sort(1)[0])  # along dim 1: the channels
    pairs = MaxMin()(x)
    assert torch.equal(pairs[:, :3], torch.maximum(x[:, 0::2], x[:, 1::2]))
    assert torch.equal(pairs[:, 3:], torch.minimum(x[:, 0::2], x[:, 1::2]))
    # non-contiguous input (the reference's view() refuses it)
    assert torch.equal(MaxMin()(x.t().contiguous().t()), pairs)
    # 1-Lipschitz in the 2-norm: the Jacobians are permutation matrices
    for module in (FullSort(), MaxMin()):
        jac = torch.autograd.functional.jacobian(lambda v: module(v.unsqueeze(0))[0], x[0])
        assert torch.equal(jac.sum(0), torch.ones(6, dtype=torch.float64))
        assert torch.equal(jac.sum(1), torch.ones(6, dtype=torch.float64))


def test_sort_and_maxmin_gradcheck():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)  # distinct values: piecewise linear, smooth here
    assert torch.autograd.gradcheck(FullSort(), (x,))
    assert torch.autograd.gradcheck(MaxMin(), (x,))
    assert torch.autograd.gradgradcheck(FullSort(), (x,))


def test_maxmin_and_fullsort_refuse_bad_shapes_clearly():
    with pytest.raises(ValueError, match=r"MaxMin: expected an input of shape \(B, D\) with D even.*\[3, 5\]"):
        MaxMin()(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"MaxMin: .*\[2, 4, 3\]"):
        MaxMin()(torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match=r"FullSort: expected an input of shape \(B, D, ...\).*\[5\]"):
        FullSort()(torch.zeros(5))


@pytest.mark.parity
def test_sin_and_zero_match_impflow(impflow_activations, device):
    case = impflow_activations
    x = case["x"].to(device).requires_grad_(True)
    y = Sin()(x)
    (grad,) = torch.autograd.grad((y * case["w"].to(device)).sum(), x, create_graph=True)
    (grad2,) = torch.autograd.grad((grad * case["w"].to(device)).sum(), x)
    # the reference's operations in the reference's order: on the CPU the same rounding (NaN at NaN and inf); a GPU's
    # sin / cos may differ by a few ulps of their argument 2 pi x (|x| <= 3 here: 2^-52 * 20 ~ 4e-15 absolute), scaled
    # by up to (2 pi)^2 in the second derivative: 1e-12 absolute leaves ~5x
    tol = dict(atol=0, rtol=0) if device == "cpu" else dict(atol=1e-12, rtol=1e-13)
    assert_close(y.detach().cpu(), case["sin"], equal_nan=True, **tol)
    assert_close(grad.detach().cpu(), case["sin_grad"], equal_nan=True, **tol)
    assert_close(grad2.cpu(), case["sin_grad2"], equal_nan=True, **tol)
    z = Zero()(x)
    assert_close(z.detach().cpu(), case["zero"], atol=0, rtol=0)  # zeros also at NaN and inf
    assert z.dtype == x.dtype and z.device == x.device


def test_zero_stays_in_the_graph_with_zero_gradients():
    x = torch.tensor([[1.0, float("nan"), float("inf")]], dtype=torch.float64, requires_grad=True)
    z = Zero()(x)
    assert z.requires_grad
    (grad,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    assert torch.equal(grad, torch.zeros_like(x))  # exactly zero, also at NaN and inf
    assert not Zero()(x.detach()).requires_grad
    assert Identity is torch.nn.Identity  # the fast path skips nn.Identity steps
