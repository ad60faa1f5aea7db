"""resflow_cuda.nn.LipSwish against the reference module (normflows' copy of residual-flows' Swish)."""

from __future__ import annotations

import pytest
import torch
from normflows.nets.lipschitz import Swish as ReferenceSwish
from torch.testing import assert_close

import resflow_cuda
from resflow_cuda.nn import LipSwish, Swish


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
