"""The fast log-det path (resflow_cuda.linearize + the linearized_* ops) against autograd."""

from __future__ import annotations

import copy
import itertools
import logging

import normflows as nf
import numpy as np
import pytest
import torch
from torch import nn

from assertions import assert_none_or_zero, assert_unbiased
from jacobians import brute_logdet
from resflow_cuda import ops
from resflow_cuda.linearize import fallback_reason, linearize
from resflow_cuda.nn import (FullSort, ImplicitBlock, InducedNormConv2d, InducedNormLinear, LipSwish, MaxMin, Sin,
                             SpectralNormConv2d, SpectralNormLinear, iResBlock)

# float64: our C++ chains vs autograd (or the twins) add the same products in another order: <= ~30 terms * 3 layers *
# 72-term dots * 2^-53 ~ 1e-12 relative; 1e-10 keeps 100x and fails on float32 rounding (2^-24 ~ 6e-8).
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def _mlp(dims, act=LipSwish, seed=0, bias=True):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [act(), InducedNormLinear(a, b, bias=bias, coeff=0.9, n_iterations=5)]
    return nn.Sequential(*layers)


def _conv(channels=(3, 8, 8, 3), preact=True, seed=0, act=LipSwish):
    """The reference's conv branch: [act] conv 3x3, act, conv 1x1, act, conv 3x3."""
    torch.manual_seed(seed)
    layers = [act()] if preact else []
    for i, (a, b, k) in enumerate(zip(channels[:-1], channels[1:], (3, 1, 3))):
        if i:
            layers.append(act())
        layers.append(InducedNormConv2d(a, b, k, 1, k // 2, coeff=0.9, n_iterations=5))
    net = nn.Sequential(*layers)
    net(torch.randn(1, channels[0], 6, 6))
    return net


def _randomize_betas(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(getattr(m, "beta", None), torch.Tensor):
                m.beta.uniform_(-1, 2)
    return net


def _run(block, x, seed, weights=None):
    np.random.seed(seed)
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y, logp = block(x, torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device))
    w = torch.ones_like(logp) if weights is None else weights
    ramp = torch.linspace(-1, 1, y[0].numel(), dtype=y.dtype, device=y.device).view_as(y[0])
    loss = (y * ramp).sum() + (w * logp).sum()
    params = list(block.nnet.parameters())
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return [y.detach(), logp.detach(), *grads]


def _compare(net, x, training=True, seeds=(1, 2), weights=None, **kwargs):
    """The fast path against autograd on x's device: both blocks there, with the same draws (the same
    seeds and calls), so that only the VJP source differs."""
    net = _randomize_betas(net).to(x.device, x.dtype)
    assert linearize(net) is not None
    fast = iResBlock(copy.deepcopy(net), **kwargs).to(x.device).train(training)
    slow = iResBlock(copy.deepcopy(net), fast_path=False, **kwargs).to(x.device).train(training)
    for seed in seeds:
        got, expected = _run(fast, x, seed, weights), _run(slow, x, seed, weights)
        for i, (a, b) in enumerate(zip(got, expected)):
            if b is None:
                assert_none_or_zero(a, f"output {i}")
            else:
                torch.testing.assert_close(a, b, **TOL[x.dtype], msg=lambda m: f"output {i}: {m}")
    return fast


SETTINGS = [dict(n_dist=d, n_samples=s, neumann_grad=n, grad_in_forward=g)
            for d, s, n, g in itertools.product(("geometric", "poisson"), (1, 3), (True, False), (True, False))]


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mlp_fast_path_equals_autograd(kwargs, training, device):
    _compare(_mlp([5, 24, 24, 5]), torch.randn(9, 5, dtype=torch.float64).to(device), training, **kwargs)


@pytest.mark.parametrize("kwargs", SETTINGS[::3], ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("preact", [True, False])
def test_conv_fast_path_equals_autograd(kwargs, preact, device):
    _compare(_conv(preact=preact), torch.randn(2, 3, 6, 6, dtype=torch.float64).to(device), **kwargs)


@pytest.mark.parametrize("act", [nn.ELU, lambda: nn.ELU(0.7), nn.Softplus,
                                 lambda: nn.Softplus(2.0, threshold=1.0), LipSwish, nf.nets.lipschitz.Swish],
                         ids=["elu", "elu0.7", "softplus", "softplus-thr", "lipswish", "normflows-swish"])
def test_activations_fast_path_equals_autograd(act, device):
    for grad_in_forward in (False, True):
        _compare(_mlp([4, 16, 4], act=act), 2 * torch.randn(8, 4, dtype=torch.float64).to(device),
                 grad_in_forward=grad_in_forward)


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_float32_fast_path_equals_autograd(grad_in_forward, device):
    _compare(_mlp([4, 32, 32, 4]), torch.randn(16, 4).to(device), grad_in_forward=grad_in_forward)
    _compare(_conv(), torch.randn(2, 3, 6, 6).to(device), grad_in_forward=grad_in_forward)


def test_plain_torch_layers_without_bias_and_a_strided_conv(device):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 8, bias=False), nn.ELU(), nn.Linear(8, 3))
    with torch.no_grad():
        for m in mlp:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.3)
    _compare(mlp, torch.randn(6, 3, dtype=torch.float64).to(device))
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), LipSwish(), nn.ConvTranspose2d(4, 2, 2, 2))
    assert linearize(conv) is None  # ConvTranspose2d is not a supported step
    down_up = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), LipSwish(), nn.Conv2d(4, 2, 1))
    assert linearize(down_up) is not None
    block = iResBlock(down_up).to(device)
    with pytest.raises(RuntimeError, match="must keep the shape"):
        block(torch.randn(2, 2, 5, 5).to(device), 0.0)


def test_spectral_norm_layers_keep_their_training_side_effects(device):
    torch.manual_seed(0)
    net = nn.Sequential(LipSwish(), SpectralNormLinear(3, 16, n_iterations=2), LipSwish(),
                        SpectralNormLinear(16, 3, n_iterations=2))
    fast = _compare(net, torch.randn(5, 3, dtype=torch.float64).to(device), seeds=(1,))
    slow = iResBlock(copy.deepcopy(_randomize_betas(net).double()), fast_path=False).to(device)
    _run(slow, torch.randn(5, 3, dtype=torch.float64).to(device), 1)
    # the same power-iteration steps on the same float64 weight: equal (a missed or extra step moves u by far more)
    torch.testing.assert_close(fast.nnet[1].u, slow.nnet[1].u)


NORMALIZED_LAYERS = {
    "spectral-conv-stride2": lambda **k: SpectralNormConv2d(3, 5, 3, (2, 1), 1, n_iterations=2, **k),
    "induced-conv3x3": lambda **k: InducedNormConv2d(3, 4, 3, 1, 1, n_iterations=3, **k),
    "induced-conv1x1": lambda **k: InducedNormConv2d(4, 3, 1, 1, 0, n_iterations=3, **k),
    # over linearize._NORMALIZED_CUDA_MAX elements: on CUDA the layer's own ops, on the CPU the fused op
    "induced-conv-large": lambda **k: InducedNormConv2d(64, 128, 3, 1, 1, n_iterations=3, **k),
    "induced-linear": lambda **k: InducedNormLinear(5, 7, n_iterations=3, **k),
    "spectral-linear": lambda **k: SpectralNormLinear(5, 7, n_iterations=2, **k),
}


@pytest.mark.parametrize("detach_sigma", [False, True], ids=["sigma", "detach"])
@pytest.mark.parametrize("coeff", [0.5, 50.0], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("name", sorted(NORMALIZED_LAYERS))
def test_fused_weight_normalization_equals_the_layers(name, coeff, detach_sigma, device):
    """The fast path's weight (one op, sigma = <W, G> for convolutions) against the layer's own
    forward_weight: value, scale buffer, power-iteration side effects, gradient and second derivative."""
    torch.manual_seed(0)
    layer = NORMALIZED_LAYERS[name](coeff=coeff, detach_sigma=detach_sigma).double().to(device)
    conv = isinstance(layer, (SpectralNormConv2d, InducedNormConv2d))
    a = torch.randn((2, layer.in_channels, 7, 5) if conv else (4, layer.in_features), dtype=torch.float64,
                    device=device)
    layer(a)  # the first forward fixes a convolution's input size
    ours = copy.deepcopy(layer)
    step = linearize(nn.Sequential(ours)).steps[0]
    got, expected = step.weight(a), layer.forward_weight(a)
    # float64, the same products summed in another order (<= 100-term dots and sigma): far below 1e-12 relative
    tol = dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(ours.scale, layer.scale, **tol)
    torch.testing.assert_close((ours.u, ours.v), (layer.u, layer.v), **tol)  # SpectralNorm* iterate in training
    assert (layer.scale > coeff).item() == (coeff == 0.5)  # the normalization is active exactly when meant to be
    r1, r2 = torch.randn_like(got), torch.randn_like(got)
    for w, param, out in ((got, ours.weight, []), (expected, layer.weight, [])):
        (g,) = torch.autograd.grad((w * r1).sum(), param, create_graph=True)
        out.append(g)
        # with detach_sigma the gradient r1 / factor is constant in the weight: no second derivative
        out.append(torch.autograd.grad((g * r2).sum(), param)[0] if g.requires_grad else None)
        (w_again,) = (step.weight(a),) if param is ours.weight else (layer.forward_weight(a),)
        out.append(torch.autograd.grad((w_again * r1).sum(), param)[0])  # without create_graph: the op's backward
        if param is ours.weight:
            mine = out
        else:
            theirs = out
    for i, (x, y) in enumerate(zip(mine, theirs)):
        if y is None:
            assert_none_or_zero(x, f"output {i}")
        else:
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"output {i}: {m}")


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_a_ready_branch_normalizes_all_its_layers_in_one_op(kind, device, monkeypatch):
    """Once every normalized layer can run without its input (a convolution after its first forward), the
    branch normalizes them all in one op (and differentiates them in one): the same weights, side effects,
    gradients and second derivatives as the layers' own forward_weight."""
    from resflow_cuda import dense_ops

    torch.manual_seed(0)
    if kind == "conv":
        layers = [InducedNormConv2d(3, 6, 3, 1, 1, n_iterations=3), InducedNormConv2d(6, 6, 1, 1, 0, n_iterations=3),
                  SpectralNormConv2d(6, 3, 3, 1, 1, n_iterations=2)]
        x = torch.randn(2, 3, 5, 4)
    else:
        layers = [InducedNormLinear(3, 8, n_iterations=3), SpectralNormLinear(8, 8, n_iterations=2),
                  InducedNormLinear(8, 3, n_iterations=3)]
        x = torch.randn(4, 3)
    net = nn.Sequential(layers[0], LipSwish(), layers[1], LipSwish(), layers[2]).double().to(device)
    x = x.double().to(device)
    calls = []
    real = dense_ops.lipschitz_normalize_
    monkeypatch.setattr(dense_ops, "lipschitz_normalize_", lambda *a: calls.append(len(a[0])) or real(*a))
    branch = linearize(net)
    branch(x)  # the first forward: a convolution records its input size, so each layer on its own
    assert calls == ([1, 1, 1] if kind == "conv" else [3])
    theirs = copy.deepcopy(net)
    calls.clear()
    g, source = branch(x)
    assert calls == [3]
    ours = source.cache.weights
    expected = [theirs[k].forward_weight(a) for k, a in zip((0, 2, 4), source.cache.layer_inputs)]
    # float64, the same products summed in another order: far below 1e-12 relative (as the test above)
    tol = dict(atol=1e-12, rtol=1e-12)
    h = x  # the branch with the expected weights (another forward of theirs would iterate SpectralNorm again)
    for k, w in zip((0, 2, 4), expected):
        a, m = (h if k == 0 else theirs[k - 1](h)), theirs[k]
        h = (nn.functional.conv2d(a, w, m.bias, m.stride, m.padding) if kind == "conv"
             else nn.functional.linear(a, w, m.bias))
    torch.testing.assert_close(g, h, **tol)
    for k, (got, want) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(got, want, **tol)
        mine, reference = net[2 * k], theirs[2 * k]
        torch.testing.assert_close((mine.scale, mine.u, mine.v), (reference.scale, reference.u, reference.v), **tol)
    rs = [torch.randn_like(w) for w in ours]
    derivatives = []
    for weights, model in ((ours, net), (expected, theirs)):
        params = [model[k].weight for k in (0, 2, 4)]
        first = torch.autograd.grad(sum((w * r).sum() for w, r in zip(weights, rs)), params, create_graph=True)
        second = torch.autograd.grad(sum((d * r).sum() for d, r in zip(first, rs)), params)
        derivatives.append((*first, *second))
    for i, (a, b) in enumerate(zip(*derivatives)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"derivative {i}: {m}")


def test_normflows_lipschitz_networks_take_the_fast_path(device):
    torch.manual_seed(0)
    mlp = nf.nets.LipschitzMLP([3, 16, 3], init_zeros=False, lipschitz_const=0.9)
    _compare(mlp, torch.randn(4, 3, dtype=torch.float64).to(device))
    cnn = nf.nets.LipschitzCNN([2, 4, 2], [3, 3], init_zeros=False, lipschitz_const=0.9)
    cnn(torch.randn(1, 2, 4, 4))  # the lazy initialisation on the CPU
    _compare(cnn, torch.randn(2, 2, 4, 4, dtype=torch.float64).to(device))


def test_per_sample_upstream_gradients_without_backward_in_forward(device):
    weights = torch.linspace(0.5, 2, 7, dtype=torch.float64).view(-1, 1).to(device)
    _compare(_mlp([3, 12, 3]), torch.randn(7, 3, dtype=torch.float64).to(device), weights=weights)


@pytest.mark.parametrize("net", [
    nn.Sequential(LipSwish(), nn.Linear(2, 2), LipSwish()),  # trailing activation
    nn.Sequential(LipSwish(), nn.ELU(), nn.Linear(2, 2)),  # two activations in a row
    nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)),  # unsupported activation
    nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, dilation=2)),
    nn.Sequential(),
    nn.Linear(2, 2),
], ids=["trailing", "double-act", "tanh", "dilated", "empty", "bare-linear"])
def test_unsupported_branches_fall_back_to_autograd(net):
    assert linearize(net) is None


def test_fallback_block_still_estimates():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.3)
    block = iResBlock(net).double()
    assert linearize(net) is None  # tanh: the autograd VJPs
    y, logp = block(torch.randn(4, 3, dtype=torch.float64), 0.0)
    logp.sum().backward()
    assert net[0].weight.grad is not None
    # the estimate is unbiased for the exact log-det (autograd's 3 x 3 Jacobian of x + g(x)): one call draws one N
    # for the batch, so the independent draws are the per-call means over copies of one point
    x = torch.randn(1, 3, dtype=torch.float64)
    np.random.seed(0)
    with torch.no_grad():
        draws = torch.stack([-block(x.expand(16, 3), 0.0)[1].mean() for _ in range(150)])
    assert_unbiased(draws, brute_logdet(block, x).item(), what="fallback log-det")  # k and seed: see assertions.py


# -- the ops themselves ---------------------------------------------------------------------------


def _chain_args(net, x):
    branch = linearize(net)
    _, source = branch(x)
    return source


def _to(args, device):
    """The ops' arguments (tensors, None, numbers and lists of them) on ``device``."""
    if isinstance(args, torch.Tensor):
        return args.to(device)
    if isinstance(args, (list, tuple)):
        return type(args)(_to(a, device) for a in args)
    return args


def test_neumann_gradient_op_equals_autograd_double_backward(device):
    net = _randomize_betas(_mlp([4, 10, 10, 4])).double().to(device)
    x = torch.randn(6, 4, dtype=torch.float64).to(device).requires_grad_(True)
    eps, w_tilde = (torch.randn(6, 4, dtype=torch.float64).to(device) for _ in range(2))
    g = net(x)
    (vjp,) = torch.autograd.grad(g, x, w_tilde, create_graph=True)
    s = (vjp * eps).sum(1)
    params = list(net.parameters())
    expected = torch.autograd.grad(s.sum(), [x, *params], allow_unused=True)
    source = _chain_args(net, x.detach())
    value, grad_x, gw, gb, gbeta = ops.linearized_neumann_gradient(w_tilde, eps, *source._gradient_args())
    torch.testing.assert_close(value, s.detach(), **TOL[torch.float64])
    torch.testing.assert_close(grad_x, expected[0], **TOL[torch.float64])
    # Parameters in order: beta, weight, bias per layer; weights here are the normalized ones.
    weights = source.cache.weights
    expected_w = torch.autograd.grad(
        (torch.autograd.grad(_apply(net, x, weights), x, w_tilde, create_graph=True)[0] * eps).sum(), weights)
    for got, exp in zip(gw, expected_w):
        torch.testing.assert_close(got, exp, **TOL[torch.float64])
    for i in range(3):
        torch.testing.assert_close(gbeta[i], expected[1 + 3 * i], **TOL[torch.float64])
        torch.testing.assert_close(gb[i], _zero_if_none(expected[3 + 3 * i], gb[i]), **TOL[torch.float64])


def _zero_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _apply(net, x, weights):
    """The branch with the given (normalized) weights as leaves."""
    h, k = x, 0
    for m in net:
        if isinstance(m, LipSwish):
            h = m(h)
        else:
            h = torch.nn.functional.linear(h, weights[k], m.bias)
            k += 1
    return h


def test_logdet_series_op_matches_autograd_terms(device):
    net = _randomize_betas(_conv()).double().to(device)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).to(device).requires_grad_(True)
    eps = torch.randn(x.shape, dtype=x.dtype).to(device)
    g = net(x)
    w, terms = eps, []
    for _ in range(4):
        (w,) = torch.autograd.grad(g, x, w, retain_graph=True)
        terms.append((w * eps).flatten(1).sum(1))
    source = _chain_args(net, x.detach())
    lc, nc = [0.5, -0.25, 2.0, 1.0], [1.0, -1.0, 0.5, 3.0]
    logdet, neumann, surrogate = ops.linearized_logdet_series(eps, source._weights, source._strides,
                                                              source._paddings, source.cache.slopes, lc, nc)
    torch.testing.assert_close(logdet, sum(c * t for c, t in zip(lc, terms)), **TOL[torch.float64])
    w, expected = eps, eps.clone()
    for c in nc:
        (w,) = torch.autograd.grad(g, x, w, retain_graph=True)
        expected = expected + c * w
    torch.testing.assert_close(neumann, expected, **TOL[torch.float64])
    (vjp,) = torch.autograd.grad(g, x, expected, retain_graph=True)
    torch.testing.assert_close(surrogate, (vjp * eps).flatten(1).sum(1), **TOL[torch.float64])
    empty = ops.linearized_logdet_series(eps, source._weights, source._strides, source._paddings,
                                         source.cache.slopes, lc, [])
    torch.testing.assert_close(empty[0], logdet)  # the same op and terms without the Neumann part: equal
    assert empty[1].numel() == 0 and empty[2].numel() == 0
    no_surrogate = ops.linearized_logdet_series(eps, source._weights, source._strides, source._paddings,
                                                source.cache.slopes, lc, nc, surrogate=False)
    torch.testing.assert_close(no_surrogate[1], neumann)  # as above: equal
    assert no_surrogate[2].numel() == 0


def test_ops_pass_opcheck():
    net = _randomize_betas(_conv((2, 4, 4, 2))).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    source = _chain_args(net, x)
    eps = torch.randn_like(x)
    for surrogate in (True, False):
        torch.library.opcheck(torch.ops.resflow_cuda.linearized_logdet_series,
                              (eps, source._weights, source._strides, source._paddings, source.cache.slopes,
                               [0.5, -0.25], [1.0, -1.0], surrogate))
    torch.library.opcheck(torch.ops.resflow_cuda.linearized_neumann_gradient,
                          (torch.randn_like(x), eps, *source._gradient_args()))


def test_empty_batch(device):
    net = _mlp([3, 8, 3]).double().to(device)
    source = _chain_args(net, torch.randn(0, 3, dtype=torch.float64, device=device))
    eps = torch.randn(0, 3, dtype=torch.float64, device=device)
    logdet, neumann, surrogate = ops.linearized_logdet_series(eps, source._weights, source._strides,
                                                              source._paddings, source.cache.slopes, [1.0], [1.0])
    assert logdet.shape == (0,) and neumann.shape == (0, 3) and surrogate.shape == (0,)
    value, grad_x, *_ = ops.linearized_neumann_gradient(eps, eps, *source._gradient_args())
    assert value.shape == (0,) and grad_x.shape == (0, 3)


def test_op_errors_name_the_argument():
    net = _mlp([3, 8, 3]).double()
    source = _chain_args(net, torch.randn(2, 3, dtype=torch.float64))
    eps = torch.randn(2, 3, dtype=torch.float64)
    w, s, p, d = source._weights, source._strides, source._paddings, source.cache.slopes
    with pytest.raises(RuntimeError, match=r"strides to have 2 entries per weight \(4\), but got 2"):
        ops.linearized_logdet_series(eps, w, s[:2], p, d, [1.0], [])
    with pytest.raises(RuntimeError, match=r"weights\[0\] of shape \[8, 3\] expects an input of shape \(B, 3\), "
                                           r"but the chain gives \[2, 4\]"):
        ops.linearized_logdet_series(torch.randn(2, 4, dtype=torch.float64), w, s, p, d, [1.0], [])
    with pytest.raises(RuntimeError, match=r"expected weights\[1\] to have the dtype of eps \(Double\), but got Float"):
        ops.linearized_logdet_series(eps, [w[0], w[1].float()], s, p, d, [1.0], [])
    with pytest.raises(RuntimeError, match=r"expected derivs\[1\] to have the input shape"):
        ops.linearized_logdet_series(eps, w, s, p, [d[0], d[0]], [1.0], [])
    with pytest.raises(RuntimeError, match=r"neumann_coeffs to be empty or to have one entry per term \(2\), but got 1"):
        ops.linearized_logdet_series(eps, w, s, p, d, [1.0, 2.0], [1.0])
    args = list(source._gradient_args())
    args[6] = [7, 1]
    with pytest.raises(RuntimeError, match=r"activations\[0\] to be 0 \(identity\).*but got 7"):
        ops.linearized_neumann_gradient(eps, eps, *args)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.linearized_logdet_series(eps.requires_grad_(True), w, s, p, d, [1.0], [])[0].sum().backward()


def test_block_under_torch_compile_matches_eager():
    net = _mlp([3, 8, 3]).double()
    block = iResBlock(net, grad_in_forward=True)
    compiled = torch.compile(block, backend="aot_eager")
    x = torch.randn(5, 3, dtype=torch.float64)
    out = []
    for fn in (block, compiled):
        np.random.seed(0)
        torch.manual_seed(0)
        y, logp = fn(x, 0.0)
        out.append((y.detach(), logp.detach()))
    # aot_eager runs the same ATen ops and custom ops on the same draws: equal up to rounding (default 1e-7 loose)
    torch.testing.assert_close(out[1][0], out[0][0])
    torch.testing.assert_close(out[1][1], out[0][1])


# -- the ops against their pure-PyTorch twins in resflow_cuda.reference ----------------------------

BRANCHES = {
    "mlp-lipswish": lambda: _mlp([5, 7, 9, 5]),
    "mlp-elu-nobias": lambda: _mlp([3, 6, 3], act=lambda: nn.ELU(0.5), bias=False),
    "mlp-softplus": lambda: _mlp([4, 11, 4], act=lambda: nn.Softplus(1.5, threshold=2.0)),
    "conv-preact": lambda: _conv((2, 5, 3, 2)),
    "conv-first": lambda: _conv((3, 4, 4, 3), preact=False, act=nn.ELU),
}


@pytest.mark.parity
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(BRANCHES))
def test_ops_match_the_reference_twins(name, dtype, device):
    """The ops on the device against their twins on the CPU, on the same (copied) arguments."""
    from resflow_cuda import reference

    net = _randomize_betas(BRANCHES[name]()).to(device, dtype)
    first = next(m for m in net.modules() if isinstance(m, (InducedNormLinear, InducedNormConv2d)))
    channels = first.weight.shape[1]
    shape = (5, channels) if first.weight.dim() == 2 else (3, channels, 6, 6)
    x = torch.randn(shape, dtype=dtype).to(device)
    source = _chain_args(net, x)
    # the MLP's eps non-contiguous (transposed on the device, as moving keeps a dense view's strides anyway)
    eps = torch.randn(shape[::-1], dtype=dtype).to(device).t() if x.dim() == 2 else torch.randn_like(x.cpu()).to(device)
    lc, nc = [1.0, -0.5, 1 / 3], [-1.0, 1.0, -0.5]
    args = (eps, source._weights, source._strides, source._paddings, source.cache.slopes, lc, nc)
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    expected_all = reference.linearized_logdet_series(*_to(args, "cpu"))
    for got, expected in zip(ops.linearized_logdet_series(*args), expected_all):
        assert got.device == x.device
        torch.testing.assert_close(got.cpu(), expected, **tol)
    w_tilde = torch.randn(shape, dtype=dtype).to(device)
    got = _to(ops.linearized_neumann_gradient(w_tilde, eps, *source._gradient_args()), "cpu")
    expected = reference.linearized_neumann_gradient(*_to((w_tilde, eps, *source._gradient_args()), "cpu"))
    torch.testing.assert_close(got[0], expected[0], **tol)
    torch.testing.assert_close(got[1], expected[1], **tol)
    for group in (2, 3, 4):
        assert len(got[group]) == len(expected[group])
        for a, b in zip(got[group], expected[group]):
            torch.testing.assert_close(a.reshape(b.shape), b, **tol)


@pytest.mark.parametrize("name", ["mlp-lipswish", "conv-preact"])
def test_neumann_gradient_op_in_bfloat16_matches_the_float64_twin(name):
    """The half types take LipSwish's own backward ops in linearized_neumann_gradient (the float32 /
    float64 path a fused kernel): bfloat16 arguments against the float64 twin on the same values."""
    from resflow_cuda import reference

    net = _randomize_betas(BRANCHES[name]()).to(torch.bfloat16)
    first = next(m for m in net.modules() if isinstance(m, (InducedNormLinear, InducedNormConv2d)))
    shape = (5, first.weight.shape[1]) if first.weight.dim() == 2 else (3, first.weight.shape[1], 6, 6)
    x = torch.randn(shape).to(torch.bfloat16)
    source = _chain_args(net, x)
    eps, w_tilde = (torch.randn(shape).to(torch.bfloat16) for _ in range(2))
    args = (w_tilde, eps, *source._gradient_args())
    got = ops.linearized_neumann_gradient(*args)
    expected = reference.linearized_neumann_gradient(*_wider(args))
    # bfloat16 keeps 8 significant bits (one rounding: 2^-8 relative); a chain of 3 layers and their sums
    # rounds a few dozen times per element, so 16 roundings' worth (2^-4) relative to the largest entry
    for a, b in zip(_flat(got), _flat(expected)):
        assert a.dtype == torch.bfloat16
        scale = b.abs().max().item() if b.numel() else 1.0
        torch.testing.assert_close(a.double().reshape(b.shape), b, atol=2.0**-4 * scale, rtol=0)


def _wider(args):
    """bfloat16 tensors (in lists too) as float64."""
    if isinstance(args, torch.Tensor):
        return args.double() if args.dtype == torch.bfloat16 else args
    if isinstance(args, (list, tuple)):
        return type(args)(_wider(a) for a in args)
    return args


def _flat(results):
    for r in results:
        yield from (r if isinstance(r, (list, tuple)) else [r])


@pytest.mark.parametrize("name", ["mlp-lipswish", "conv-preact", "mlp-softplus"])
def test_neumann_surrogate_gradcheck(name, device):
    """The surrogate <w~^T J(x), eps> with w~ and eps fixed, as a function of x, against finite differences."""
    net = _randomize_betas(BRANCHES[name]()).double().to(device)
    first = next(m for m in net.modules() if isinstance(m, (InducedNormLinear, InducedNormConv2d)))
    shape = (3, first.weight.shape[1]) if first.weight.dim() == 2 else (2, first.weight.shape[1], 4, 4)
    x = torch.randn(shape, dtype=torch.float64).to(device).requires_grad_(True)
    w_tilde, eps = (torch.randn(shape, dtype=torch.float64).to(device) for _ in range(2))

    def surrogate(x):
        _, source = linearize(net)(x)
        return source.surrogate(w_tilde, eps)

    assert torch.autograd.gradcheck(surrogate, (x,))


# -- forward-mode Jacobians of dense branches (the basic estimator and exact determinants at small D) --

JACOBIAN_BRANCHES = {
    "lipswish": lambda: _mlp([2, 16, 16, 2]),
    "normflows-swish": lambda: _mlp([3, 9, 3], act=nf.nets.lipschitz.Swish),
    "elu-nobias": lambda: _mlp([3, 7, 3], act=lambda: nn.ELU(0.6), bias=False),
    "softplus": lambda: _mlp([2, 8, 2], act=lambda: nn.Softplus(2.0, threshold=1.0)),
    "no-preact": lambda: nn.Sequential(nn.Linear(2, 6), LipSwish(), nn.Linear(6, 2)),
}


@pytest.mark.parametrize("name", sorted(JACOBIAN_BRANCHES))
def test_forward_mode_jacobian_equals_autograd(name, device):
    from resflow_cuda import estimators as est

    net = _randomize_betas(JACOBIAN_BRANCHES[name]()).double().to(device)
    dim = next(m for m in net.modules() if hasattr(m, "weight")).weight.shape[1]
    x = 2 * torch.randn(6, dim, dtype=torch.float64).to(device)
    x_fast, x_slow = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g, jac = linearize(net).jacobian(x_fast)
    g_ref = net(x_slow)
    jac_ref = est.batch_jacobian(g_ref, x_slow)
    torch.testing.assert_close(g, g_ref, **TOL[torch.float64])
    torch.testing.assert_close(jac, jac_ref, **TOL[torch.float64])
    weights = torch.randn_like(jac)  # a loss on J and g differentiates like autograd's double backward
    params = list(net.parameters())
    got = torch.autograd.grad((weights * jac).sum() + g.sum(), [x_fast, *params], allow_unused=True)
    expected = torch.autograd.grad((weights * jac_ref).sum() + g_ref.sum(), [x_slow, *params], allow_unused=True)
    for a, b in zip(got, expected):
        if b is None:
            assert_none_or_zero(a, "gradient")
        else:
            torch.testing.assert_close(a, b, **TOL[torch.float64])
    assert torch.autograd.gradcheck(lambda v: linearize(net).jacobian(v)[1], (x[:3].clone().requires_grad_(True),))


def test_forward_mode_jacobian_refuses_convolutions_and_images():
    with pytest.raises(ValueError, match="dense branch.*convolutional"):
        linearize(_conv()).jacobian(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"x of shape \(B, D\).*\[2, 3, 1\]"):
        linearize(_mlp([3, 4, 3])).jacobian(torch.randn(2, 3, 1))


def _count_jacobians(monkeypatch):
    from resflow_cuda.linearize import LinearizedBranch

    calls = []
    original = LinearizedBranch.jacobian

    def counting(self, x):
        calls.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(LinearizedBranch, "jacobian", counting)
    return calls


@pytest.mark.parametrize("kwargs", [dict(n_dist="geometric"), dict(n_dist="poisson", n_samples=3),
                                    dict(grad_in_forward=True), dict(n_power_series=4)],
                         ids=["geometric", "poisson-3", "grad-in-forward", "truncated"])
def test_low_dimensional_basic_estimator_takes_forward_mode(kwargs, monkeypatch):
    # ELU branches: LipSwish ones take the fused dense block in training (tests/test_dense_block.py)
    calls = _count_jacobians(monkeypatch)
    for dtype in (torch.float64, torch.float32):
        _compare(_mlp([2, 16, 16, 2], act=nn.ELU), torch.randn(10, 2, dtype=dtype), neumann_grad=False,
                 seeds=(1, 2, 3), **kwargs)
    assert calls and all(shape == (10, 2) for shape in calls)


def test_forward_mode_only_when_cheaper_than_the_series(monkeypatch):
    calls = _count_jacobians(monkeypatch)
    _compare(_mlp([3, 8, 3], act=nn.ELU), torch.randn(4, 3, dtype=torch.float64), neumann_grad=False,
             n_power_series=3)
    assert not calls  # D = 3 is not fewer than the 3 terms: autograd VJPs
    _compare(_mlp([3, 8, 3], act=nn.ELU), torch.randn(4, 3, dtype=torch.float64), neumann_grad=False,
             n_power_series=4)
    assert calls


@pytest.mark.parametrize("kwargs", [dict(), dict(brute_force=True), dict(exact_trace=True, n_power_series=5)],
                         ids=["eval-2d", "brute-force", "exact-trace"])
def test_exact_jacobian_paths_take_forward_mode(kwargs, monkeypatch):
    calls = _count_jacobians(monkeypatch)
    _compare(_mlp([2, 12, 2]), torch.randn(7, 2, dtype=torch.float64), training="brute_force" in kwargs
             or "exact_trace" in kwargs, **kwargs)
    assert calls


# -- branches the fused chain does not take: visibly on autograd ----------------------------------


def _permutation_branch(act, width=8):
    torch.manual_seed(0)
    return nn.Sequential(act(), InducedNormLinear(4, width, coeff=0.9, n_iterations=5), act(),
                         InducedNormLinear(width, 4, coeff=0.9, n_iterations=5))


@pytest.mark.parametrize("act", [FullSort, MaxMin, Sin], ids=["fullsort", "maxmin", "sin"])
def test_branches_with_non_elementwise_or_unknown_activations_fall_back_visibly(act, caplog):
    net = _permutation_branch(act)
    assert linearize(net) is None
    reason = fallback_reason(net)
    assert f"step 0 ({act.__name__})" in reason and "elementwise" in reason
    block = iResBlock(net)
    assert f"fast_path=autograd (step 0 ({act.__name__})" in repr(block)
    assert "fast_path=False" in repr(iResBlock(_permutation_branch(act), fast_path=False))
    assert "fast_path=linearized" in repr(iResBlock(_mlp([4, 8, 4])))
    implicit = ImplicitBlock(_mlp([4, 8, 4]), _permutation_branch(act))
    assert f"fast_path=autograd (nnet_z: step 0 ({act.__name__})" in repr(implicit)
    fresh = _permutation_branch(act)
    with caplog.at_level(logging.DEBUG, logger="resflow_cuda.linearize"):
        linearize(fresh)
        linearize(fresh)
    messages = [r.getMessage() for r in caplog.records if r.name == "resflow_cuda.linearize"]
    assert len(messages) == 1 and "autograd VJPs instead of the linearized fast path" in messages[0]  # once per branch


@pytest.mark.parametrize("act", [FullSort, MaxMin], ids=["fullsort", "maxmin"])
@pytest.mark.parametrize("kwargs", [dict(), dict(grad_in_forward=True), dict(neumann_grad=False)],
                         ids=["neumann", "neumann-mem-eff", "basic"])
def test_permutation_branches_train_on_the_fallback(act, kwargs):
    """The fallback is the autograd path: fast_path=True and False give the same values and gradients."""
    net = _permutation_branch(act).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    got = _run(iResBlock(copy.deepcopy(net), **kwargs), x, 3)
    expected = _run(iResBlock(copy.deepcopy(net), fast_path=False, **kwargs), x, 3)
    for a, b in zip(got, expected):
        # the same autograd computation, the same draws: equal
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert all(g is not None and torch.isfinite(g).all() for g in got[2:])
