"""resflow_cuda.nn.iResBlock against normflows' copy of the reference block, the exact log-det,
and its own contracts (inverse, errors, statistics)."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import normflows as nf
import numpy as np
import pytest
import torch
from normflows.flows.residual import iResBlock as NfBlock

import resflow_cuda
from resflow_cuda import estimators as est
from resflow_cuda.nn import InducedNormLinear, LipSwish, iResBlock, logdet_exact

from test_integrations_normflows import _float64_default
from assertions import assert_none_or_zero, assert_unbiased, drop_roulette_reweighting, shift_roulette_survival

pytestmark = pytest.mark.filterwarnings("ignore:.*did not converge")


def _mlp(dims, seed=1, coeff=0.9):
    torch.manual_seed(seed)
    net = nf.nets.LipschitzMLP(dims, lipschitz_const=coeff, init_zeros=False)
    for m in net.modules():
        if hasattr(m, "compute_weight"):
            m.compute_weight(update=True, n_iterations=20)
    return net


def _cnn(channels, seed=1):
    torch.manual_seed(seed)
    net = nf.nets.LipschitzCNN(channels, [3, 1, 3], lipschitz_const=0.9, init_zeros=False)
    net(torch.randn(1, channels[0], 5, 5))  # the lazy u/v initialisation
    return net


def _pair(net, dtype=torch.float64, device="cpu", **kwargs):
    ref = NfBlock(copy.deepcopy(net), **kwargs).to(device, dtype)
    ours = iResBlock(copy.deepcopy(net), **kwargs).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _step(block, x, seed, logpx=True, weights=None):
    """One seeded call: outputs, the gradients of a loss of both outputs w.r.t. x and every parameter."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    if not logpx:
        y = block(x)
        loss, logp = y.square().sum(), None
    else:
        y, logp = block(x, torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device))
        w = torch.ones_like(logp) if weights is None else weights
        loss = y.square().sum() + (w * logp).sum()
    params = [p for p in block.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return y.detach(), None if logp is None else logp.detach(), grads


def _assert_same(a, b, atol=1e-10, rtol=1e-9):
    # float64, the same net, draws and terms; normflows' autograd VJPs (or another of our paths) and our fused series
    # add the same products in another order: <= ~30 terms * 3 layers * 72-term dots * 2^-53 ~ 1e-12 relative;
    # 1e-9 keeps >= 1e3x and fails on float32 rounding (2^-24 ~ 6e-8).
    ya, la, ga = a
    yb, lb, gb = b
    torch.testing.assert_close(yb, ya, atol=atol, rtol=rtol)
    if la is not None:
        torch.testing.assert_close(lb, la, atol=atol, rtol=rtol)
    assert len(ga) == len(gb)
    for i, (u, v) in enumerate(zip(ga, gb)):
        if u is None:
            assert_none_or_zero(v, f"gradient {i}: reference has none")
        else:
            torch.testing.assert_close(v, u, atol=atol, rtol=rtol, msg=lambda m: f"gradient {i}: {m}")


SETTINGS = [
    dict(n_dist=dist, n_samples=s, neumann_grad=neu, grad_in_forward=gif)
    for dist, s, neu, gif in itertools.product(("geometric", "poisson"), (1, 3), (True, False), (True, False))
]


@pytest.mark.parity
@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_normflows_on_an_mlp(kwargs, training, device):
    # on CUDA both blocks draw their probes there, from the same seed in the same order: the same probes
    ref, ours = _pair(_mlp([4, 16, 16, 4]), device=device, **kwargs)
    ref.train(training)
    ours.train(training)
    x = torch.randn(7, 4, dtype=torch.float64).to(device)
    # Both blocks run normflows' layers, whose factor max(ones(1), sigma / coeff) is rounded to float32 for a
    # float64 layer, and so is its gradient; normflows (backward-in-forward) rounds the log-det's and g's
    # share of that gradient apart, the fused dense block their sum: float32 rounding, which the float64
    # default dtype (a float64 ones(1)) takes away (see _float64_default).
    with _float64_default():
        for seed in (3, 4):
            _assert_same(_step(ref, x, seed), _step(ours, x, seed))
    for name in ("last_n_samples", "last_firmom", "last_secmom"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=1e-6, rtol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("kwargs", [SETTINGS[0], SETTINGS[6], SETTINGS[11]],
                         ids=lambda k: "-".join(str(v) for v in k.values()))
def test_matches_normflows_on_a_cnn(kwargs, device):
    ref, ours = _pair(_cnn([2, 8, 8, 2]), device=device, **kwargs)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64).to(device)
    _assert_same(_step(ref, x, 5), _step(ours, x, 5))


def _one_output_step(block, x, seed, output):
    """The gradients of a loss of one output only (the other gets no gradient at all, not zeros)."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y, logp = block(x, torch.zeros(x.shape[0], 1, dtype=x.dtype))
    loss = y.square().sum() if output == "y" else (logp * 2).sum()
    params = [p for p in block.parameters() if p.requires_grad]
    return y.detach(), logp.detach(), torch.autograd.grad(loss, [x, *params], allow_unused=True)


def test_create_graph_through_a_backward_in_forward_block_gives_its_gradients():
    # create_graph=True (grad mode on in backward): the parameter gradients' sums run on addcmul there (the fused
    # sum refuses tensors that require grad) and agree with the autograd path's (fast_path=False). As in the
    # reference's backward-in-forward, g's share is taken without a graph, so no second derivative is asked for.
    _, fast = _pair(_cnn([2, 8, 8, 2]), n_dist="poisson", neumann_grad=True, grad_in_forward=True)
    slow = copy.deepcopy(fast)
    slow.fast_path = False
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    results = []
    for block in (fast, slow):
        np.random.seed(4)
        torch.manual_seed(4)
        x_in = x.clone().requires_grad_(True)
        y, logp = block(x_in, torch.zeros(3, 1, dtype=torch.float64))
        params = list(block.nnet.parameters())
        logp_scaled = logp * torch.ones((), dtype=torch.float64, requires_grad=True)  # an upstream that needs grad
        results.append(torch.autograd.grad(logp_scaled.sum() + y.square().sum(), [x_in, *params], create_graph=True))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)  # float64, as _assert_same


@pytest.mark.parity
@pytest.mark.parametrize("output", ["y", "logp"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])  # the fused dense block's and the linearized path's Function
def test_a_loss_of_one_output_matches_normflows(net, output):
    ref, ours = _pair(_mlp([3, 8, 3]) if net == "mlp" else _cnn([2, 8, 8, 2]), n_dist="poisson", neumann_grad=True,
                      grad_in_forward=True)
    x = torch.randn(*((6, 3) if net == "mlp" else (3, 2, 5, 5)), dtype=torch.float64)
    with _float64_default():
        _assert_same(_one_output_step(ref, x, 2, output), _one_output_step(ours, x, 2, output))


@pytest.mark.parity
@pytest.mark.parametrize("kwargs,dim", [
    (dict(brute_force=True), 2), (dict(exact_trace=True), 2), (dict(exact_trace=True), 3),
    (dict(n_power_series=5), 2), (dict(n_power_series=5), 3), (dict(exact_trace=True, n_dist="poisson"), 3),
], ids=str)
def test_exact_and_truncated_branches_match_normflows(kwargs, dim, device):
    ref, ours = _pair(_mlp([dim, 8, dim]), device=device, **kwargs)
    x = torch.randn(5, dim, dtype=torch.float64).to(device)
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        _assert_same(_step(ref, x, 7), _step(ours, x, 7))


@pytest.mark.parity
def test_float32_matches_normflows(device):
    ref, ours = _pair(_mlp([3, 32, 3]), dtype=torch.float32, device=device, grad_in_forward=True)
    x = torch.randn(9, 3).to(device)
    _assert_same(_step(ref, x, 11), _step(ours, x, 11), atol=2e-5, rtol=2e-5)


@pytest.mark.parity
def test_without_logpx_returns_x_plus_g(device):
    ref, ours = _pair(_mlp([3, 8, 3]), device=device)
    x = torch.randn(4, 3, dtype=torch.float64).to(device)
    _assert_same(_step(ref, x, 0, logpx=False), _step(ours, x, 0, logpx=False))


def _cpu(step):
    y, logp, grads = step
    return y.cpu(), None if logp is None else logp.cpu(), [None if g is None else g.cpu() for g in grads]


# (branch, settings): the Neumann gradient and the basic estimator, each with and without backward-in-forward,
# geometric and Poisson N, one and three draws of N; a convolutional branch.
CROSS_DEVICE = [("mlp", SETTINGS[0]), ("mlp", SETTINGS[3]), ("mlp", SETTINGS[13]), ("mlp", SETTINGS[14]),
                ("cnn", SETTINGS[1]), ("cnn", SETTINGS[6])]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("branch,kwargs", CROSS_DEVICE,
                         ids=[b + "-" + "-".join(str(v) for v in k.values()) for b, k in CROSS_DEVICE])
def test_cuda_matches_cpu(branch, kwargs, training, dtype, cuda, probes_drawn_on_cpu):
    """The block on CUDA against the same block on the CPU: the same net and N (NumPy's draws), and the
    same probes (drawn on the CPU for both: probes_drawn_on_cpu), so only the devices' arithmetic differs."""
    net = _mlp([4, 16, 16, 4]) if branch == "mlp" else _cnn([2, 8, 8, 2])
    block = iResBlock(net, **kwargs).to(dtype).train(training)
    moved = copy.deepcopy(block).to(cuda)
    x = torch.randn((7, 4) if branch == "mlp" else (3, 2, 5, 5), dtype=torch.float64).to(dtype)
    # float64 as _assert_same (sums in another order); float32 as test_float32_matches_normflows: each side
    # rounds the same products in its own order and errs by ~10 2^-24 relative against the float64 result
    tol = {} if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for seed in (3, 4):
        _assert_same(_step(block, x, seed), _cpu(_step(moved, x.to(cuda), seed)), **tol)


def test_state_dict_layout_and_dtypes_match_the_reference():
    ref, ours = _pair(_mlp([3, 8, 3]), dtype=torch.float32, n_samples=3)
    ref = NfBlock(copy.deepcopy(ref.nnet), n_samples=3)
    ours = iResBlock(copy.deepcopy(ref.nnet), n_samples=3)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (ka, a), (kb, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert a.dtype == b.dtype and a.shape == b.shape, ka
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert ours.geom_p.dtype == torch.float64 and ours.lamb.dtype == torch.float32
    ours.load_state_dict(NfBlock(copy.deepcopy(ref.nnet), n_samples=3, geom_p=0.3).state_dict())
    assert math.isclose(torch.sigmoid(ours.geom_p).item(), 0.3)  # float64 logit then sigmoid: a few ulps < 1e-9


@pytest.mark.parity
def test_normflows_residual_state_dict_loads_into_the_block():
    flow = nf.flows.Residual(_mlp([3, 8, 3]), reduce_memory=True)
    block = iResBlock(_mlp([3, 8, 3], seed=9))
    block.load_state_dict({k.removeprefix("iresblock."): v for k, v in flow.state_dict().items()})
    x = torch.randn(4, 3)
    torch.testing.assert_close(block(x), flow.iresblock(x))


# -- the estimator against the exact log-det --------------------------------------------------


# One call draws one N for the whole batch, so the independent draws are the per-call means.


def _aligned_branch():
    """g(x) = W2 LipSwish(W1 x) with W2 = W1^T before the layers' normalisation (coeff 0.9): the Jacobian
    W1^T D W1 has large, mostly positive eigenvalues (log-det ~0.7 at the test point), so the series' higher
    terms matter. A random net's terms nearly cancel (log-det ~0.01 for _mlp([3, 16, 3])), and a check that
    sees only the first term cannot tell a wrong roulette weight from the right one."""
    torch.manual_seed(0)
    first = InducedNormLinear(3, 16, coeff=0.9, n_iterations=5)
    second = InducedNormLinear(16, 3, coeff=0.9, n_iterations=5)
    with torch.no_grad():
        second.weight.copy_(first.weight.T)
    net = torch.nn.Sequential(first, LipSwish(), second)
    resflow_cuda.update_lipschitz(net, n_iterations=50)
    return net


def _logdet_draws(dist, offset, n_draws=400):
    """Per-call means of the basic estimator at one point (64 copies) and the exact log-det there."""
    np.random.seed(0)
    torch.manual_seed(0)
    block = iResBlock(_aligned_branch(), n_dist=dist, n_exact_terms=offset, neumann_grad=False).double()
    x = torch.randn(1, 3, dtype=torch.float64).expand(64, 3).contiguous()
    exact = logdet_exact(block, x[:1]).item()
    with torch.no_grad():
        draws = torch.stack([-block(x, 0.0)[1].mean() for _ in range(n_draws)])
    return draws, exact


@pytest.mark.parametrize("dist,offset", [("geometric", 0), ("geometric", 2), ("poisson", 0), ("poisson", 3)])
def test_the_estimator_is_unbiased(dist, offset):
    draws, exact = _logdet_draws(dist, offset)
    assert_unbiased(draws, exact, what=f"{dist} log-det")  # 5 standard errors, seeded (assertions.py)


@pytest.mark.parametrize("dist,bias", [("geometric", drop_roulette_reweighting), ("poisson", shift_roulette_survival)],
                         ids=["geometric-no-reweighting", "poisson-shifted-survival"])
def test_the_unbiasedness_check_rejects_a_biased_roulette(dist, bias, monkeypatch):
    """Negative control: the same draws and check with a wrong roulette weight (assertions.py)."""
    bias(monkeypatch)
    draws, exact = _logdet_draws(dist, 0)
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(draws, exact, what=f"biased {dist} log-det")


def _neumann_gradient_draws(n_draws=150):
    """Per-call Neumann gradients (64 copies of one point) and the exact log-det's gradient there."""
    block = iResBlock(_aligned_branch(), n_exact_terms=1, grad_in_forward=True).double()
    torch.manual_seed(0)
    params = [p for p in block.nnet.parameters() if p.requires_grad]
    x0 = torch.randn(1, 3, dtype=torch.float64)
    exact = torch.autograd.grad(logdet_exact_with_graph(block, x0).sum(), params, allow_unused=True)
    x = x0.expand(64, 3).contiguous()
    np.random.seed(1)
    draws = [torch.autograd.grad(-block(x, 0.0)[1].mean(), params, allow_unused=True) for _ in range(n_draws)]
    return draws, exact


def _assert_gradients_unbiased(draws, exact):
    for i, truth in enumerate(exact):
        if truth is None:  # the last bias does not move the log-det
            for g in draws:
                assert_none_or_zero(g[i], f"gradient {i}")
            continue
        # 5 standard errors, seeded (assertions.py); 1e-12 only for entries the draws do not move, which must then
        # match to float64 rounding
        assert_unbiased(torch.stack([g[i] for g in draws]), truth, slack=1e-12, what=f"gradient {i}")


def test_the_neumann_gradient_is_unbiased():
    _assert_gradients_unbiased(*_neumann_gradient_draws())


def test_the_gradient_check_rejects_a_biased_roulette(monkeypatch):
    """Negative control: the same draws and check with the survival index shifted by one (assertions.py)."""
    shift_roulette_survival(monkeypatch)
    with pytest.raises(AssertionError, match="standard errors"):
        _assert_gradients_unbiased(*_neumann_gradient_draws())


def logdet_exact_with_graph(block, x):
    x = x.requires_grad_(True)
    g = block.nnet(x)
    jac = est.batch_jacobian(g, x)
    return torch.linalg.slogdet(torch.eye(x.shape[1], dtype=x.dtype) + jac).logabsdet


def test_eval_2d_uses_the_exact_determinant(device):
    block = iResBlock(_mlp([2, 16, 2])).double().eval().to(device)
    x = torch.randn(6, 2, dtype=torch.float64).to(device)
    _, logp = block(x, 0.0)
    # float64 2 x 2 determinants of the same Jacobian built two ways: ~1e-16; the default 1e-7 is loose, but the
    # estimator instead of the exact branch errs by >= 1e-3
    torch.testing.assert_close(-logp, logdet_exact(block, x))


def test_logdet_exact_of_a_conv_block_matches_dense_jacobian(device):
    block = iResBlock(_cnn([2, 4, 4, 2])).double().to(device)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64).to(device)
    jac = torch.autograd.functional.jacobian(lambda t: block.nnet(t).sum(0), x).reshape(18, 2, 18).permute(1, 0, 2)
    expected = torch.linalg.slogdet(torch.eye(18, dtype=torch.float64, device=device) + jac).logabsdet.view(-1, 1)
    # float64 slogdet of the same 18 x 18 Jacobian (cond(I + J) <= 19 for Lip(g) < 0.9): ~1e-14; default loose
    torch.testing.assert_close(logdet_exact(block, x), expected)


# -- options beyond the reference ---------------------------------------------------------------


def test_logdet_estimate_reports_the_estimate_with_the_same_gradient():
    net = _mlp([3, 16, 3])
    plain = iResBlock(copy.deepcopy(net)).double()
    reporting = iResBlock(copy.deepcopy(net), logdet_estimate=True).double()
    basic = iResBlock(copy.deepcopy(net), neumann_grad=False).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    surrogate, estimate, basic_value = (_step(b, x, 21) for b in (plain, reporting, basic))
    # float64, the same terms summed by two code paths: ~1e-15 (the surrogate differs by O(0.1)); default loose
    torch.testing.assert_close(estimate[1], basic_value[1])  # the real estimate, same N and probe
    assert not torch.allclose(estimate[1], surrogate[1])
    for a, b in zip(surrogate[2], estimate[2]):
        torch.testing.assert_close(b, a)  # the same graph: equal
    torch.testing.assert_close(plain.last_logdet_estimate, -basic_value[1])


def test_torch_rng_mode_reproduces_with_torch_manual_seed_alone():
    block = iResBlock(_mlp([3, 16, 3]), rng="torch").double()
    x = torch.randn(5, 3, dtype=torch.float64)
    outs = []
    for numpy_seed in (0, 1):
        np.random.seed(numpy_seed)
        torch.manual_seed(3)
        outs.append(block(x, 0.0)[1])
    torch.testing.assert_close(outs[0], outs[1])  # the same draws and ops: equal


def test_grad_in_forward_uses_the_whole_upstream_gradient_for_x(device):
    net = _mlp([3, 16, 3])
    weights = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).view(-1, 1).to(device)
    mem = iResBlock(copy.deepcopy(net), grad_in_forward=True).double().to(device)
    plain = iResBlock(copy.deepcopy(net), grad_in_forward=False).double().to(device)
    for p in itertools.chain(mem.nnet.parameters(), plain.nnet.parameters()):
        p.requires_grad_(False)
    x = torch.randn(6, 3, dtype=torch.float64).to(device)
    _assert_same(_step(plain, x, 2, weights=weights), _step(mem, x, 2, weights=weights))


def test_grad_in_forward_refuses_a_per_sample_weighted_parameter_gradient():
    block = iResBlock(_mlp([3, 16, 3]), grad_in_forward=True).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    weights = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).view(-1, 1)
    with pytest.raises(RuntimeError, match="grad_in_forward=False"):
        _step(block, x, 2, weights=weights)


@pytest.mark.parity
def test_works_under_no_grad_and_in_eval():
    ref, block = _pair(_mlp([3, 16, 3]))
    x = torch.randn(4, 3, dtype=torch.float64)
    outs = []
    for training in (True, False):
        block.train(training)
        ref.train(training)
        np.random.seed(5)
        torch.manual_seed(5)
        with torch.no_grad():
            y, logp = block(x, 0.0)
        np.random.seed(5)  # the same N and probes: normflows' block, with autograd on, estimates the same value
        torch.manual_seed(5)
        y_ref, logp_ref = ref(x, torch.zeros(4, 1, dtype=torch.float64))
        _assert_same((y, logp, ()), (y_ref.detach(), logp_ref.detach(), ()))
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1])  # InducedNorm forwards do not iterate: the same weight and ops, equal


# -- inverse --------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_sample", [False, True])
def test_inverse_round_trip(per_sample):
    block = iResBlock(_mlp([4, 32, 4]), inverse_per_sample=per_sample, inverse_atol=1e-12, inverse_rtol=1e-12)
    x = torch.randn(16, 4)
    with torch.no_grad():
        back = block.inverse(block(x))
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    report = block.last_inverse_report
    assert report.converged and report.max_residual < 1 and report.iterations > 0
    if per_sample:
        assert report.sample_iterations.shape == (16,) and (report.sample_iterations >= 0).all()


@pytest.mark.parity
def test_inverse_matches_normflows_and_returns_the_log_density(device):
    ref, ours = _pair(_mlp([3, 16, 3]), device=device)
    ref.eval()
    ours.eval()
    y = torch.randn(5, 3, dtype=torch.float64).to(device)
    zero = torch.zeros(5, 1, dtype=torch.float64, device=device)
    np.random.seed(0)
    torch.manual_seed(0)
    xr, lr = ref.inverse(y, zero)
    np.random.seed(0)
    torch.manual_seed(0)
    xo, lo = ours.inverse(y, zero)
    # float64, the same fixed-point steps on the shared net with the same stopping rule (a different stop would
    # differ by ~1e-3), then the log-det as in _assert_same: its tolerances (the default 1e-7 hid float32 rounding)
    torch.testing.assert_close(xo, xr, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lo, lr, atol=1e-10, rtol=1e-9)


class _Expanding(torch.nn.Module):
    def forward(self, x):
        return 1.5 * x


def test_a_non_converging_inverse_warns_and_reports():
    block = iResBlock(_Expanding(), inverse_max_iterations=20)
    with pytest.warns(RuntimeWarning, match="did not converge in 21 iterations.*lipschitz_report"):
        block.inverse(torch.randn(3, 2))
    assert not block.last_inverse_report.converged


def test_inverse_of_nan_raises():
    block = iResBlock(_mlp([3, 8, 3]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        block.inverse(torch.tensor([[0.0, float("nan"), 1.0]]))


def test_nan_input_propagates_to_the_log_det():
    block = iResBlock(_mlp([3, 8, 3]))
    x = torch.randn(3, 3)
    x[1, 0] = float("nan")
    y, logp = block(x, 0.0)
    assert torch.isnan(logp[1]).all() and torch.isfinite(logp[[0, 2]]).all()


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(geom_p=1.0), "geom_p in \\(0, 1\\)"), (dict(lamb=0.0), "lamb > 0"),
    (dict(n_dist="uniform"), "n_dist .*'uniform'"), (dict(rng="cuda"), "rng .*'cuda'"),
    (dict(n_samples=0), "n_samples .*>= 1.*0"), (dict(n_power_series=0), "n_power_series"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        iResBlock(_mlp([2, 4, 2]), **kwargs)


def test_nnet_must_be_a_module():
    with pytest.raises(TypeError, match="nnet.*function"):
        iResBlock(lambda x: x)


def test_inputs_without_a_batch_dimension_are_refused():
    block = iResBlock(_mlp([3, 8, 3]))
    with pytest.raises(ValueError, match=r"shape \(B, ...\) with at least 2 dimensions, but got torch.Size\(\[3\]\)"):
        block(torch.randn(3), 0.0)


def test_brute_force_needs_2d():
    block = iResBlock(_mlp([3, 8, 3]), brute_force=True)
    with pytest.raises(ValueError, match=r"brute_force=True.*\(B, 2\).*\[4, 3\]"):
        block(torch.randn(4, 3), 0.0)


def test_exact_trace_needs_flat_inputs():
    block = iResBlock(_cnn([2, 4, 4, 2]), exact_trace=True)
    with pytest.raises(ValueError, match=r"exact_trace=True.*\(B, D\).*\[2, 2, 5, 5\]"):
        block(torch.randn(2, 2, 5, 5), 0.0)


def test_logdet_exact_checks_its_arguments():
    with pytest.raises(TypeError, match="nnet"):
        logdet_exact(torch.nn.Linear(2, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        logdet_exact(iResBlock(_mlp([2, 4, 2])), torch.randn(3))


def test_exported_names():
    assert resflow_cuda.nn.iResBlock is iResBlock
    assert resflow_cuda.logdet_exact is logdet_exact
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repr(iResBlock(_mlp([2, 4, 2])))


@pytest.mark.parametrize("samples", [[3], [2, 5, 1]])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float64])
def test_training_statistics_are_the_means_of_the_value(samples, value_dtype):
    # float32 buffers, a float32 or float64 value
    buffers = [torch.full((len(samples),), -1.0), torch.full((1,), -1.0), torch.full((1,), -1.0)]
    value = torch.randn(37, generator=torch.Generator().manual_seed(0), dtype=value_dtype) * 3 + 1
    est.record_statistics(*buffers, est.SeriesPlan((1.0,), np.array(samples)), value.requires_grad_(True))
    assert buffers[0].tolist() == samples
    # The reference's torch.mean(value) and torch.mean(value ** 2) (squares rounded to the value's dtype), summed
    # here in float64 (37 terms: ~1e-15 relative apart from any other order), then rounded to the value's dtype and
    # the buffer's float32: the same float32 number or, next to a rounding boundary, its neighbour (one ulp).
    for buffer, terms in ((buffers[1], value.detach()), (buffers[2], value.detach() ** 2)):
        exact = terms.double().mean().item()
        assert abs(buffer.item() - exact) <= torch.finfo(torch.float32).eps * abs(exact)
    assert not any(b.requires_grad for b in buffers)
