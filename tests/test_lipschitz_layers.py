"""The Lipschitz layers against normflows' InducedNorm* and the reference SpectralNorm* (shared
seeds, so equal weights and buffers), exact norms, checkpoints, and the model-wide helpers."""

from __future__ import annotations

import copy

import pytest
import torch
from normflows.nets import lipschitz as nf
from normflows.nets.lipschitz import LipschitzCNN, LipschitzMLP
from normflows.utils.optim import update_lipschitz as nf_update_lipschitz
from torch.testing import assert_close

import resflow_cuda
from resflow_cuda import nn as rnn
from resflow_cuda import reference as R
from conftest import cudnn_deterministic

INF = float("inf")


def _same_state(a: torch.nn.Module, b: torch.nn.Module):
    """Equal keys, order, dtypes and shapes; equal parameters; buffers equal up to float rounding
    (dense power iteration runs in a fused kernel; convolutions match bit for bit)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        if key.rsplit(".", 1)[-1] in ("u", "v", "scale"):
            assert_close(sa[key], sb[key], atol=1e-6, rtol=1e-5, msg=key)
        else:
            assert torch.equal(sa[key], sb[key]), key


def _close(a, b):
    assert_close(a, b, atol=1e-6, rtol=1e-5)


def _pair(ours_cls, ref_cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    ours = ours_cls(*args, **kwargs)
    torch.manual_seed(seed)
    ref = ref_cls(*args, **kwargs)
    return ours, ref


def _forward_backward(module, x):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(torch.ones_like(y) + torch.arange(y.numel(), device=y.device).view_as(y) * 0.01)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return y, grads


LINEAR_SETTINGS = [
    dict(n_iterations=5), dict(atol=1e-3, rtol=1e-3), dict(n_iterations=5, domain=1, codomain=2),
    dict(n_iterations=5, domain=2, codomain=INF), dict(n_iterations=4, domain=3, codomain=1.5),
    dict(n_iterations=5, zero_init=True, coeff=0.9), dict(n_iterations=5, bias=False),
]


@pytest.mark.parity
@pytest.mark.parametrize("kwargs", LINEAR_SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_induced_norm_linear_equals_normflows(kwargs, device):
    ours, ref = _pair(rnn.InducedNormLinear, nf.InducedNormLinear, 20, 10, **kwargs)
    _same_state(ours, ref)  # construction: weights, 200 iterations, restarts (on the CPU)
    ours, ref = ours.to(device), ref.to(device)
    x = torch.randn(7, 20).to(device)
    y1, g1 = _forward_backward(ours, x)
    y2, g2 = _forward_backward(ref, x)
    _close(y1, y2)
    for a, b in zip(g1, g2):
        _close(a, b)
    with torch.no_grad():
        ours.weight.mul_(1.7)
        ref.weight.mul_(1.7)
    ours.compute_weight(update=True)
    ref.compute_weight(update=True)
    _same_state(ours, ref)
    _close(ours(x), ref(x))


CONV_SETTINGS = [dict(n_iterations=5), dict(atol=1e-3, rtol=1e-3), dict(n_iterations=5, domain=1, codomain=2),
                 dict(n_iterations=5, domain=2, codomain=INF), dict(n_iterations=4, domain=3, codomain=1.5)]


@pytest.mark.parity
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("kwargs", CONV_SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_induced_norm_conv2d_equals_normflows(kernel, kwargs, device):
    ours, ref = _pair(rnn.InducedNormConv2d, nf.InducedNormConv2d, 3, 5, kernel, 1, kernel // 2, **kwargs)
    ours, ref = ours.to(device), ref.to(device)
    x = torch.randn(2, 3, 6, 5).to(device)
    outputs = []
    for module in (ours, ref):
        torch.manual_seed(1)  # the lazy initialisation at the first forward draws u and v (on the device, both)
        outputs.append(_forward_backward(module, x))
    (y1, g1), (y2, g2) = outputs
    _close(y1, y2)
    for a, b in zip(g1, g2):
        _close(a, b)
    _same_state(ours, ref)
    ours.compute_weight(update=True)
    ref.compute_weight(update=True)
    _same_state(ours, ref)


@pytest.mark.parity
@pytest.mark.parametrize("kwargs", [dict(n_iterations=3), dict(atol=1e-3, rtol=1e-3),
                                    dict(n_iterations=50, atol=1e-3, rtol=1e-3)])
def test_spectral_norm_linear_equals_the_reference(kwargs, device):
    ours, ref = _pair(rnn.SpectralNormLinear, R.SpectralNormLinear, 12, 7, **kwargs)
    _same_state(ours, ref)
    ours, ref = ours.to(device), ref.to(device)
    x = torch.randn(4, 12).to(device)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(ref, mode)()
        y1, g1 = _forward_backward(ours, x)
        y2, g2 = _forward_backward(ref, x)
        _close(y1, y2)
        for a, b in zip(g1, g2):
            _close(a, b)
        _same_state(ours, ref)


@pytest.mark.parity
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("kwargs", [dict(n_iterations=3), dict(atol=1e-3, rtol=1e-3)])
def test_spectral_norm_conv2d_equals_the_reference(kernel, kwargs, device):
    ours, ref = _pair(rnn.SpectralNormConv2d, R.SpectralNormConv2d, 3, 4, kernel, 1, kernel // 2, **kwargs)
    ours, ref = ours.to(device), ref.to(device)
    x = torch.randn(2, 3, 6, 5).to(device)
    for _ in range(2):
        torch.manual_seed(1)  # the first forward draws u and v
        y1, g1 = _forward_backward(ours, x)
        torch.manual_seed(1)
        y2, g2 = _forward_backward(ref, x)
        _close(y1, y2)
        for a, b in zip(g1, g2):
            _close(a, b)
        _same_state(ours, ref)


@pytest.mark.parity
def test_update_lipschitz_equals_normflows_on_whole_models(device):
    for build in (lambda: LipschitzMLP([2, 16, 16, 16, 2], max_lipschitz_iter=5),
                  lambda: LipschitzCNN([3, 8, 8, 3], [3, 1, 3], max_lipschitz_iter=4)):
        torch.manual_seed(0)
        ref = build()
        ours = copy.deepcopy(ref)
        _swap_layers(ours)
        ours, ref = ours.to(device), ref.to(device)
        x = (torch.randn(4, 2) if isinstance(ref, LipschitzMLP) else torch.randn(2, 3, 5, 6)).to(device)
        torch.manual_seed(2)
        ref(x)
        torch.manual_seed(2)
        ours(x)
        _same_state(ours, ref)
        with torch.no_grad():
            for a, b in zip(ours.parameters(), ref.parameters()):
                noise = torch.randn_like(a)
                a.add_(noise)
                b.add_(noise)
        nf_update_lipschitz(ref, 7)
        resflow_cuda.update_lipschitz(ours, 7)
        _same_state(ours, ref)
        _close(ours(x), ref(x))


def _swap_layers(model: torch.nn.Module) -> None:
    """Replaces normflows' InducedNorm* layers by ours with the same constructor settings and state."""
    for name, child in model.named_children():
        if isinstance(child, nf.InducedNormLinear):
            new = rnn.InducedNormLinear(child.in_features, child.out_features, coeff=child.coeff,
                                        n_iterations=child.n_iterations, atol=child.atol, rtol=child.rtol)
        elif isinstance(child, nf.InducedNormConv2d):
            new = rnn.InducedNormConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                        child.padding, coeff=child.coeff, n_iterations=child.n_iterations,
                                        atol=child.atol, rtol=child.rtol)
        else:
            _swap_layers(child)
            continue
        new.load_state_dict(child.state_dict())
        setattr(model, name, new)


def test_update_lipschitz_batches_equal_shapes_with_per_layer_results(device):
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[rnn.InducedNormLinear(16, 16, n_iterations=4) for _ in range(3)],
                                 rnn.SpectralNormLinear(16, 16, n_iterations=2), rnn.SpectralNormLinear(16, 16,
                                                                                                          n_iterations=2))
    layers = layers.to(device)
    twins = copy.deepcopy(layers)
    with torch.no_grad():
        for p in layers.parameters():
            p.mul_(1.3)
        for p in twins.parameters():
            p.mul_(1.3)
    resflow_cuda.update_lipschitz(layers)  # batched: 3 + 2 layers in two op calls
    for layer in twins:
        layer.compute_weight(update=True)
    _same_state(layers, twins)


@pytest.mark.parametrize("settings", [dict(n_iterations=3), dict(atol=1e-3, rtol=1e-3)], ids=["fixed", "tol"])
def test_update_lipschitz_takes_conv_sigma_from_the_op(settings, monkeypatch, device):
    """k x k convolutions: update_lipschitz writes the op's u, v and sigma (one convolution fewer than
    compute_weight); the same u and v, and sigma up to rounding, as compute_weight(update=True). On CUDA
    with cuDNN's deterministic algorithms, so that both run the same sums."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(rnn.InducedNormConv2d(3, 8, 3, 1, 1, **settings),
                                 rnn.InducedNormConv2d(8, 3, 3, 1, 1, domain=1.5, codomain=3, **settings),
                                 rnn.SpectralNormConv2d(3, 5, 3, 1, 1, **settings))
    layers(torch.randn(2, 3, 6, 5))
    layers = layers.to(device)
    with torch.no_grad():
        for p in layers.parameters():
            p.mul_(1.3)
    twins = copy.deepcopy(layers)
    with monkeypatch.context() as patched, cudnn_deterministic():
        patched.setattr(type(layers[0]), "_sigma", lambda *args: pytest.fail("compute_weight's sigma was used"))
        patched.setattr(type(layers[2]), "_sigma", lambda *args: pytest.fail("compute_weight's sigma was used"))
        resflow_cuda.update_lipschitz(layers)
    with cudnn_deterministic():
        for layer in twins:
            layer.compute_weight(update=True)
    for ours, theirs in zip(layers, twins):
        assert torch.equal(ours.u, theirs.u) and torch.equal(ours.v, theirs.v)
        assert_close(ours.scale, theirs.scale, atol=0, rtol=1e-5)
        assert not torch.equal(ours.scale, torch.zeros_like(ours.scale))


def test_sigma_matches_exact_norms(device):
    torch.manual_seed(0)
    layer = rnn.InducedNormLinear(30, 20, n_iterations=2000).to(device)
    layer.compute_weight(update=True)
    assert_close(layer.scale, torch.linalg.matrix_norm(layer.weight.detach(), 2), rtol=1e-5, atol=0)
    conv = rnn.InducedNormConv2d(3, 4, 3, 1, 1, n_iterations=3000).to(device)
    conv(torch.randn(1, 3, 5, 4).to(device))
    report = resflow_cuda.lipschitz_report(conv)
    assert report[0]["method"] == "svd"
    assert_close(torch.tensor(report[0]["sigma"]), torch.tensor(report[0]["sigma_exact"]), rtol=1e-4, atol=0)


def test_lipschitz_report_flags_layers_above_their_bound(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(rnn.InducedNormLinear(8, 8, n_iterations=100, coeff=0.9),
                                rnn.LopLinear(8, 8, coeff=0.9), rnn.InducedNormConv2d(2, 2, 3, 1, 1, n_iterations=50),
                                rnn.InducedNormConv2d(2, 2, 3, 1, 1, n_iterations=50, domain=3, codomain=3))
    model = model.to(device)
    model[2](torch.randn(1, 2, 7, 6).to(device))
    model[3](torch.randn(1, 2, 5, 5).to(device))
    report = {r["name"]: r for r in resflow_cuda.lipschitz_report(model)}
    assert report["0"]["meets_coeff"] and report["1"]["meets_coeff"] and report["2"]["meets_coeff"]
    assert report["2"]["method"] == "svd" and report["1"]["method"] == "closed-form"
    assert report["3"]["sigma_exact"] is None and report["3"]["meets_coeff"] is None
    # Beyond exact_conv_max_inputs the FFT of the circular convolution bounds the exact norm.
    bound = {r["name"]: r for r in resflow_cuda.lipschitz_report(model, exact_conv_max_inputs=0)}["2"]
    assert bound["method"] == "fft-bound"
    assert report["2"]["sigma_exact"] <= bound["sigma_exact"] <= 1.5 * report["2"]["sigma_exact"]
    with torch.no_grad():
        model[0].weight.mul_(3)  # the stale scale no longer bounds the weight
    assert not {r["name"]: r for r in resflow_cuda.lipschitz_report(model)}["0"]["meets_coeff"]


@pytest.mark.parity
def test_checkpoints_load_without_a_dummy_forward():
    torch.manual_seed(0)
    ref = nf.InducedNormConv2d(3, 5, 3, 1, 1, n_iterations=5)
    x = torch.randn(2, 3, 6, 5)
    y = ref(x)  # u and v get their operator sizes
    ours = rnn.InducedNormConv2d(3, 5, 3, 1, 1, n_iterations=5)
    ours.load_state_dict(ref.state_dict())  # post-initialisation shapes into a fresh layer
    _close(ours(x), y)
    fresh = nf.InducedNormConv2d(3, 5, 3, 1, 1, n_iterations=5).state_dict()
    ours.load_state_dict(fresh)  # and back to a pre-initialisation checkpoint
    assert ours.u.shape == (5,) and not ours._initialized
    torch.manual_seed(0)
    spectral = rnn.SpectralNormConv2d(3, 4, 3, 1, 1, n_iterations=2)
    spectral(x)
    again = rnn.SpectralNormConv2d(3, 4, 3, 1, 1, n_iterations=2)
    again.load_state_dict(spectral.state_dict())
    spectral.eval()
    again.eval()
    assert torch.equal(again(x), spectral(x))


def test_forward_reads_no_buffer_on_the_host(monkeypatch, device):
    conv = rnn.InducedNormConv2d(3, 5, 3, 1, 1, n_iterations=5).to(device)
    x = torch.randn(2, 3, 6, 5).to(device)
    conv(x)

    def no_sync(*args, **kwargs):
        raise AssertionError("a host synchronisation in forward")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
    conv(x)
    rnn.InducedNormLinear(4, 4, n_iterations=2).to(device)(torch.randn(3, 4).to(device))


def test_detach_sigma_treats_sigma_as_a_constant():
    ours, plain = _pair(rnn.InducedNormLinear, rnn.InducedNormLinear, 6, 6, n_iterations=5, coeff=0.1)
    ours.detach_sigma = True
    x = torch.randn(3, 6)
    ours(x).sum().backward()
    plain(x).sum().backward()
    factor = float(ours.scale) / 0.1
    assert_close(ours.weight.grad, torch.ones(6, 3) @ x / factor)
    assert not torch.allclose(ours.weight.grad, plain.weight.grad)


def test_explicit_rtol_is_used_unless_the_reference_quirk_is_asked_for():
    for quirk in (False, True):
        torch.manual_seed(0)
        layer = rnn.InducedNormLinear(20, 20, atol=1e-2, rtol=1e-2, reference_rtol_quirk=quirk)
        noise = torch.randn(20, 20, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            layer.weight.add_(noise)
        # rtol=1 stops after one step; with the quirk it becomes atol = 1e-9 and runs longer.
        layer.compute_weight(update=True, atol=1e-9, rtol=1.0)
        torch.manual_seed(0)
        twin = rnn.InducedNormLinear(20, 20, atol=1e-2, rtol=1e-2)
        with torch.no_grad():
            twin.weight.add_(noise)
        twin.compute_weight(update=True, n_iterations=1)
        assert torch.equal(layer.u, twin.u) != quirk


@pytest.mark.parity
def test_learnable_norm_orders_follow_normflows(device):
    domain, codomain = torch.nn.Parameter(torch.tensor(0.0)), torch.nn.Parameter(torch.tensor(0.3))
    ours, ref = _pair(rnn.InducedNormLinear, nf.InducedNormLinear, 9, 6, n_iterations=3, domain=domain,
                      codomain=codomain)
    _same_state(ours, ref)
    ours, ref = ours.to(device), ref.to(device)  # the shared orders move with the first
    ours.compute_weight(update=True)
    ref.compute_weight(update=True)
    _same_state(ours, ref)
    a, b = ours.compute_one_iter(), ref.compute_one_iter()
    _close(a, b)
    (ga,) = torch.autograd.grad(a, domain)
    (gb,) = torch.autograd.grad(b, domain)
    _close(ga, gb)
    assert ga != 0


def test_lop_layers_meet_their_closed_form_norms():
    torch.manual_seed(0)
    for domain, codomain, norm in [(INF, INF, lambda w: w.abs().sum(1).max()), (1, 1, lambda w: w.abs().sum(0).max()),
                                   (1, 2, lambda w: w.norm(dim=0).max()), (2, INF, lambda w: w.norm(dim=1).max())]:
        layer = rnn.get_linear(10, 7, coeff=0.5, domain=domain, codomain=codomain)
        assert isinstance(layer, rnn.LopLinear)
        with torch.no_grad():
            layer.weight.mul_(5)
        weight = layer.compute_weight()
        assert_close(layer.scale, norm(layer.weight.detach()))
        assert norm(weight.detach()) <= 0.5 + 1e-6
    assert isinstance(rnn.get_linear(4, 4, domain=2, codomain=2, n_iterations=1), rnn.InducedNormLinear)
    assert isinstance(rnn.get_conv2d(2, 2, 3, 1, 1, domain=1, codomain=2), rnn.LopConv2d)
    assert isinstance(rnn.get_conv2d(2, 2, 3, 1, 1, domain=2, codomain=2, n_iterations=1), rnn.InducedNormConv2d)


@pytest.mark.parametrize("cls,kwargs,pattern", [
    (rnn.InducedNormLinear, dict(coeff=0.0), "coeff must be > 0"),
    (rnn.InducedNormLinear, dict(domain=0.5), r"domain must be a norm order >= 1"),
    (rnn.InducedNormLinear, dict(codomain=-1), r"codomain must be a norm order >= 1"),
    (rnn.InducedNormLinear, dict(n_iterations=-2), r"n_iterations must be None or an integer >= 0"),
    (rnn.SpectralNormLinear, dict(atol=-1e-3, rtol=1e-3), r"atol must be None or >= 0"),
])
def test_bad_settings_are_refused(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(4, 4, **{"n_iterations": 1, **kwargs})


def test_compiled_forward_has_no_graph_break():
    torch.manual_seed(0)
    model = torch.nn.Sequential(rnn.InducedNormLinear(6, 8, n_iterations=3), rnn.LipSwish(),
                                rnn.InducedNormLinear(8, 6, n_iterations=3))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 6)
    assert_close(compiled(x), model(x))
